"""NeMo GPT configs for the supported architectures, with per-run overrides."""

from __future__ import annotations

from typing import Any

import torch
from nemo.collections import llm

ARCHITECTURES: dict[str, type[llm.GPTConfig]] = {
    "gpt": llm.GPTConfig,
    "llama": llm.Llama2Config7B,
    "mistral": llm.MistralConfig7B,
}

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_config_overrides() -> dict[str, Any]:
    """Settings that megatron-core needs without CUDA kernels, Apex or Transformer Engine."""
    from megatron.core.transformer.enums import AttnBackend

    return {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "masked_softmax_fusion": False,
        "cross_entropy_loss_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "attention_backend": AttnBackend.local,
    }


def build_gpt_config(
    arch: str,
    overrides: dict[str, Any],
    *,
    precision: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    context_parallel: int,
    on_cpu: bool,
) -> llm.GPTConfig:
    """The NeMo config of ``arch`` with ``overrides`` (sizes, seq_length, ...) applied."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"model.precision: {precision!r} is not one of {sorted(PRECISION_DTYPES)}")
    config_cls = ARCHITECTURES[arch]
    known = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model.config: {config_cls.__name__} has no field(s) {unknown}")
    dtype = PRECISION_DTYPES[precision]
    values: dict[str, Any] = {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": pipeline_parallel,
        "context_parallel_size": context_parallel,
    }
    if arch == "mistral":
        values["window_size"] = None  # full attention; the tuple form breaks megatron's softmax cache
    if on_cpu:
        values.update(cpu_config_overrides())
    values.update(overrides)
    return config_cls(**values)
