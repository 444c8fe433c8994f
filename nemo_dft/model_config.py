"""NeMo GPT configs for the supported architectures, with per-run overrides."""

from __future__ import annotations

from typing import Any

from nemo.collections import llm

from nemo_dft.cpu_config import apply_cpu_model_overrides
from nemo_dft.precision import PRECISIONS

ARCHITECTURES: dict[str, type[llm.GPTConfig]] = {
    "gpt": llm.GPTConfig,
    "llama": llm.Llama2Config7B,
    "mistral": llm.MistralConfig7B,
}

PRECISION_DTYPES = {name: dtype for name, (_, dtype) in PRECISIONS.items()}


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
    values.update(overrides)
    config = config_cls(**values)
    return apply_cpu_model_overrides(config) if on_cpu else config
