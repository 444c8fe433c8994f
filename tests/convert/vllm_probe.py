"""Load exported HF directories in vLLM and report prompt log-probs (test helper).

Runs in ``.venv-gen`` (vLLM needs transformers 5; NeMo pins 4.57), so it imports nothing from
nemo_dft.  Prints one line ``RESULT {json}`` keyed by model directory.
"""

from __future__ import annotations

import json
import sys

PROMPT = "What is the capital of France?"


def probe(path: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0)
    output = llm.generate([{"prompt_token_ids": ids}], params)[0]
    logprobs = [
        entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)
    ]
    return {"prompt_ids": list(ids), "prompt_logprobs": logprobs, "chat_template": tokenizer.chat_template}


def main() -> None:
    print("RESULT " + json.dumps({path: probe(path) for path in sys.argv[1:]}), flush=True)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
