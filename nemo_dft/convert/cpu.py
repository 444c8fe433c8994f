"""Model-config overrides that let a NeMo GPT model build and run forward on a CPU.

Megatron's fused kernels and Transformer-Engine attention do not exist on a CPU, so every
model built there needs these settings.  They are applied by assignment, which NeMo's IO
tracking does not record: a checkpoint saved on a CPU keeps the portable (fused, GPU) settings
in its context, and whoever loads it on a CPU applies the overrides again.
"""

from __future__ import annotations

from typing import Any

import torch

_CPU_FLAGS = {
    "use_cpu_initialization": True,
    "gradient_accumulation_fusion": False,
    "masked_softmax_fusion": False,
    "cross_entropy_loss_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "persist_layer_norm": False,
}


def cpu_model_overrides(config: Any) -> dict[str, Any]:
    """The attribute values a model config needs on a CPU (see :func:`apply_cpu_model_overrides`)."""
    from megatron.core.transformer.enums import AttnBackend

    overrides: dict[str, Any] = {**_CPU_FLAGS, "attention_backend": AttnBackend.local}
    window = getattr(config, "window_size", None)
    if window is not None:
        # The unfused softmax caches its sliding-window mask with lru_cache, which needs a
        # hashable window: a tuple keeps Mistral's window where ``None`` would drop it.
        overrides["window_size"] = tuple(window)
    return overrides


def apply_cpu_model_overrides(config: Any) -> Any:
    """Set the CPU overrides on ``config`` in place (unrecorded by NeMo IO) and return it."""
    for key, value in cpu_model_overrides(config).items():
        setattr(config, key, value)
    return config


def on_cpu() -> bool:
    """Whether this process has no GPU and must run NeMo on the CPU."""
    return not torch.cuda.is_available()


def prepare_process() -> bool:
    """Enable the CPU shim when no GPU is present; return whether it is active."""
    from nemo_dft.cpu_compat import maybe_enable_cpu_compat

    active = maybe_enable_cpu_compat()
    if active:
        disable_unavailable_rope_fusion()
    return active


def disable_unavailable_rope_fusion() -> None:
    """Let configs that default to ``apply_rope_fusion=True`` be built where its kernel is missing.

    ``LlamaConfig`` defaults to the fused RoPE of Transformer Engine, and megatron's
    ``TransformerConfig.__post_init__`` raises when TE is absent, so neither NeMo's Llama importer
    nor ``load_context`` of a Llama checkpoint can build its config on a CPU.  The flag is
    cleared on the instance only; the saved context keeps the portable default.  Idempotent.
    """
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    kernels = (rope_utils.fused_apply_rotary_pos_emb, rope_utils.fused_apply_rotary_pos_emb_thd)
    original = TransformerConfig.__post_init__
    if any(k is not None for k in kernels) or getattr(original, "_nemo_dft_rope", False):
        return

    def __post_init__(self: TransformerConfig) -> None:
        if self.apply_rope_fusion and not self.multi_latent_attention:
            self.apply_rope_fusion = False
        original(self)

    __post_init__._nemo_dft_rope = True  # type: ignore[attr-defined]
    TransformerConfig.__post_init__ = __post_init__
