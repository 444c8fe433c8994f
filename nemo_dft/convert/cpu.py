"""CPU preparation for conversion: the CPU shim and the model-config overrides (nemo_dft.platform.cpu_model_config)."""

from __future__ import annotations

import torch

from nemo_dft.platform.cpu_model_config import apply_cpu_model_overrides, cpu_model_overrides

__all__ = ["apply_cpu_model_overrides", "cpu_model_overrides", "on_cpu", "prepare_process"]


def on_cpu() -> bool:
    """Whether this process has no GPU and must run NeMo on the CPU."""
    return not torch.cuda.is_available()


def prepare_process() -> bool:
    """Enable the CPU shim when no GPU is present; return whether it is active."""
    from nemo_dft.platform.cpu_shim import maybe_enable_cpu_compat

    return maybe_enable_cpu_compat()
