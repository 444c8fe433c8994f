"""Generation backends: each turns (prompt token ids, n, seed) requests into n token-id lists.

Both take the same requests and return raw token ids, so prompt building and the cleaning of
samples stay in shared code.  Heavy imports (torch, transformers models, vllm) happen only when a
backend is built.
"""

from __future__ import annotations

from typing import Any

from nemo_dft.generation.backends.base import Backend, Request


def build_backend(cfg: Any, tokenizer: Any, stop_ids: set[int]) -> Backend:
    """The backend named by ``cfg.backend``, loaded with ``cfg.model`` and ``cfg.sampling``."""
    if cfg.backend == "hf":
        from nemo_dft.generation.backends.hf import HFBackend

        return HFBackend(cfg.model, cfg.sampling, cfg.hf, tokenizer, stop_ids)
    if cfg.backend == "vllm":
        from nemo_dft.generation.backends.vllm_backend import VLLMBackend

        return VLLMBackend(cfg.model, cfg.sampling, cfg.vllm)
    raise ValueError(f"unknown backend {cfg.backend!r}")


__all__ = ["Backend", "Request", "build_backend"]
