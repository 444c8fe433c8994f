"""HF transformers ``generate`` backend: no vLLM needed, for small models and tests.

Each prompt is generated alone (its n samples as one batch) after seeding torch with the
request's seed, so a sample depends only on (prompt, seed), never on batch neighbours or padding.
"""

from __future__ import annotations

from typing import Any

from nemo_dft.generation.backends.base import Request


class HFBackend:
    name = "hf"
    batch_size = 1

    def __init__(
        self, model_cfg: Any, sampling: Any, hf_cfg: Any, tokenizer: Any, stop_ids: set[int]
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self._torch = torch
        self._threads_before = torch.get_num_threads()
        if hf_cfg.num_threads:  # CPU: torch's default (all cores) spins badly on a shared machine
            torch.set_num_threads(int(hf_cfg.num_threads))
        if hf_cfg.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = str(hf_cfg.device)
        dtype = "auto" if model_cfg.dtype == "auto" else getattr(torch, str(model_cfg.dtype))
        model = AutoModelForCausalLM.from_pretrained(
            str(model_cfg.path), revision=model_cfg.revision, dtype=dtype
        )
        self.model = model.to(self.device).eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids, default=0)
        # A fresh GenerationConfig: only the configured sampling settings apply, not the defaults
        # a checkpoint may ship (repetition penalty, ...), as with explicit vLLM SamplingParams.
        self.generation_config = GenerationConfig(
            do_sample=True,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=max(int(sampling.top_k), 0),
            max_new_tokens=int(sampling.max_new_tokens),
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id,
            bos_token_id=model.generation_config.bos_token_id,
        )

    def generate(self, requests: list[Request]) -> list[list[list[int]]]:
        torch = self._torch
        results: list[list[list[int]]] = []
        for request in requests:
            torch.manual_seed(request.seed)  # seeds the CUDA generators too
            input_ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self.generation_config,
                    num_return_sequences=request.n,
                )
            prompt_len = input_ids.shape[1]
            results.append([row[prompt_len:].tolist() for row in out])
        return results

    def close(self) -> None:
        del self.model
        self._torch.set_num_threads(self._threads_before)
