"""Score one chat prompt in vLLM three ways (test helper for the LoRA export): the exported base with
the exported PEFT adapter, the merged export, and the base alone.

Runs in ``.venv-gen`` (vLLM), so it imports nothing from nemo_dft.  Prints one line
``RESULT {json}`` with the prompt log-probs of each, once all three are done (with three engines in
one process, vLLM's teardown at interpreter exit may then abort; the line is what counts).
"""

from __future__ import annotations

import json
import sys

PROMPT = "What is the capital of France?"


def prompt_logprobs(model: str, adapter: str | None) -> list[float]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              gpu_memory_utilization=0.3, enable_lora=adapter is not None, max_lora_rank=8)
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    request = LoRARequest("dft", 1, adapter) if adapter else None
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    output = llm.generate([{"prompt_token_ids": ids}], params, lora_request=request)[0]
    return [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]


def main() -> None:
    base, adapter, merged = sys.argv[1:4]
    result = {"adapter": prompt_logprobs(base, adapter), "merged": prompt_logprobs(merged, None),
              "base": prompt_logprobs(base, None)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
