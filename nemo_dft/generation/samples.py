"""Turning generated token ids into the stored negative text, identically for every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stop_token_ids(model_path: str | Path, revision: str | None, tokenizer: Any) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (both backends stop there)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(model_path), revision=revision).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        eos = None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return ids


def generated_length(token_ids: list[int], stop_ids: set[int]) -> int:
    """Tokens actually generated: up to and including the first stop token (HF pads after it)."""
    cut = next((i for i, tok in enumerate(token_ids) if tok in stop_ids), None)
    return len(token_ids) if cut is None else cut + 1


def clean_sample(token_ids: list[int], tokenizer: Any, stop_ids: set[int]) -> tuple[str, bool]:
    """(text, stopped): the sample up to its first stop token, decoded, with any EOS text and the
    leading whitespace removed as in the paper; ``stopped`` is False when it ran to the length cap."""
    cut = next((i for i, tok in enumerate(token_ids) if tok in stop_ids), None)
    kept = token_ids if cut is None else token_ids[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if tokenizer.eos_token:
        text = text.replace(tokenizer.eos_token, "")
    return text.lstrip(), cut is not None


def is_empty(text: str) -> bool:
    return not text.strip()
