"""Model-config overrides that let a NeMo GPT model build and run on a CPU.

Megatron's fused kernels and Transformer-Engine attention do not exist on a CPU, so every model
built there needs these settings.  They are applied by assignment after the config is built,
which NeMo's IO tracking does not record: a checkpoint written on a CPU keeps the portable (GPU)
settings in its context, and whoever loads it on a CPU applies the overrides again.  Importing
this module does not import NeMo.
"""

from __future__ import annotations

from typing import Any

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
