"""Logit comparison between an HF checkpoint and a NeMo checkpoint of the same model.

Matching tensor names proves little (a norm left at its init value still has the right name);
matching logits on real prompts and random tokens proves the two sides compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_dft.convert.mapping import unwrap_module

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about gradient descent.",
    "Explain discriminative fine-tuning in one sentence.",
)


@dataclass
class LogitComparison:
    """Result of comparing two models' logits on the same inputs."""

    max_abs_diff: float
    per_input: list[tuple[str, int, float]] = field(default_factory=list)  # (label, tokens, max diff)
    argmax_agreement: float = 1.0
    stored_dtypes: tuple[str, str] = ("float32", "float32")  # (HF, NeMo) weights as stored on disk

    @property
    def same_stored_dtype(self) -> bool:
        """Both sides hold the same numbers, so only kernel differences remain."""
        return self.stored_dtypes[0] == self.stored_dtypes[1]

    def summary(self) -> str:
        lines = [f"  {label:<40} {n:>4} tokens  max|diff| = {diff:.3e}" for label, n, diff in self.per_input]
        lines.append(
            f"max abs logit diff: {self.max_abs_diff:.3e}  (argmax agreement {self.argmax_agreement:.1%})"
        )
        return "\n".join(lines)


def load_hf_model(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """An HF causal LM in eval mode with eager attention (no fused-kernel differences)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager")
    return model.eval()


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The [1, 1, s, s] boolean mask (True = masked) that megatron's local attention needs."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


@torch.no_grad()
def nemo_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded_vocab] of a NeMo GPT model for unpadded token ids."""
    device = next(unwrap_module(model).parameters()).device
    input_ids = input_ids.to(device)
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    return model(input_ids, positions, attention_mask=causal_mask(input_ids.shape[1], device)).float().cpu()


@torch.no_grad()
def hf_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids.to(model.device)).logits.float().cpu()


def compare_logits(hf_model: Any, nemo_model: Any, inputs: list[tuple[str, torch.Tensor]]) -> LogitComparison:
    """Max |HF - NeMo| logit difference over labelled [1, s] token-id tensors."""
    result = LogitComparison(max_abs_diff=0.0)
    agree = total = 0
    for label, ids in inputs:
        expected = hf_logits(hf_model, ids)
        actual = nemo_logits(nemo_model, ids)[..., : expected.shape[-1]]
        diff = (expected - actual).abs().max().item()
        result.per_input.append((label, ids.shape[1], diff))
        result.max_abs_diff = max(result.max_abs_diff, diff)
        agree += (expected.argmax(-1) == actual.argmax(-1)).sum().item()
        total += ids.numel()
    result.argmax_agreement = agree / max(total, 1)
    return result


def verification_inputs(
    tokenizer: Any,
    vocab_size: int,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    random: int = 2,
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """Prompts rendered with the chat template (when there is one), plus random token sequences."""
    inputs = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        else:
            ids = tokenizer(prompt)["input_ids"]
        inputs.append((prompt[:40], torch.tensor([ids], dtype=torch.long)))
    generator = torch.Generator().manual_seed(seed)
    for index in range(random):
        ids = torch.randint(0, vocab_size, (1, 48), generator=generator)
        inputs.append((f"random tokens #{index}", ids))
    return inputs
