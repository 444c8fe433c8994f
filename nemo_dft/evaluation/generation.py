"""Greedy answers to evaluation prompts: vLLM (through the negatives generator's backend, at
temperature 0) where it is installed, HF ``generate`` otherwise.

Prompts are the training prompts (the chat template without a generation prompt, BOS as in
training), so the model continues exactly where training taught it to answer; the answer text is
the generated response without the template's assistant header and end-of-turn text.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm

from nemo_dft.data.tokenize import render
from nemo_dft.evaluation.examples import EvalExample

SENTINEL = "\u2063ANSWER\u2063"
BACKENDS = ("auto", "vllm", "hf")


def resolve_backend(setting: str) -> str:
    """``auto``: vllm where importable, else hf; ``vllm`` without vLLM is a ValueError."""
    available = importlib.util.find_spec("vllm") is not None
    if setting == "auto":
        return "vllm" if available else "hf"
    if setting == "vllm" and not available:
        raise ValueError("backend: vllm is not installed in this environment (use .venv-gen, or backend=hf)")
    if setting not in BACKENDS:
        raise ValueError(f"backend: {setting!r} is not one of {', '.join(BACKENDS)}")
    return setting


def prompt_ids(tokenizer: Any, example: EvalExample, add_bos: bool) -> list[int]:
    """The training prompt's token ids (BOS first unless the template already starts with it)."""
    prompt, _ = render(tokenizer, example.chat(SENTINEL))
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def answer_text(tokenizer: Any, example: EvalExample, generated: list[int]) -> str:
    """The answer in ``generated``: up to the first EOS, without the template's assistant header
    and end-of-turn text (found by rendering a placeholder answer)."""
    eos = tokenizer.eos_token_id
    if eos in generated:
        generated = generated[: generated.index(eos)]
    text = tokenizer.decode(generated, skip_special_tokens=False)
    _, response = render(tokenizer, example.chat(SENTINEL))
    head, tail = response.split(SENTINEL, 1)
    if head.strip() and text.startswith(head):
        text = text[len(head):]
    elif head.strip() and text.lstrip().startswith(head.strip()):
        text = text.lstrip()[len(head.strip()):]
    end = tail.strip()
    if end and end in text:
        text = text[: text.index(end)]
    return text.strip()


@torch.no_grad()
def hf_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
              device: str, progress: bool = True) -> list[list[int]]:
    """Greedy continuations with HF ``generate``, left-padded batches of ``batch_size`` prompts."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=pad, bos_token_id=model.generation_config.bos_token_id)
    outputs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress):
        chunk = prompts[start: start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        outputs.extend(row[width:].tolist() for row in out.cpu())
    return outputs


def vllm_greedy(model_path: str, prompts: list[list[int]], *, max_new_tokens: int, dtype: str,
                batch_size: int) -> list[list[int]]:
    """Greedy continuations with the generator's vLLM backend (temperature 0: argmax decoding)."""
    from nemo_dft.generation.backends.base import Request
    from nemo_dft.generation.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(
        SimpleNamespace(path=model_path, revision=None, tensor_parallel_size=1, dtype=dtype),
        SimpleNamespace(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, seed=0),
        SimpleNamespace(cpu_kvcache_space_gib=4, batch_size=batch_size, enforce_eager=True,
                        gpu_memory_utilization=0.8, max_model_len=None),
    )
    try:
        results = backend.generate([Request(prompt_ids=p, n=1, seed=0) for p in prompts])
    finally:
        backend.close()
    return [samples[0] for samples in results]
