"""NeMo GPT configs for the supported architectures, with per-run overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

from nemo.collections import llm
from omegaconf import DictConfig

from nemo_dft.config.loading import ConfigError
from nemo_dft.config.training import model_config_overrides
from nemo_dft.platform import memory
from nemo_dft.platform.cpu_model_config import apply_cpu_model_overrides
from nemo_dft.platform.precision import PRECISIONS

ARCHITECTURES: dict[str, type[llm.GPTConfig]] = {
    "gpt": llm.GPTConfig,
    "llama": llm.Llama2Config7B,
    "mistral": llm.MistralConfig7B,
    "qwen2": llm.Qwen25Config7B,  # q/k/v biases
    "qwen3": llm.Qwen3Config8B,  # per-head q/k RMSNorm
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
    base: llm.GPTConfig | None = None,
) -> llm.GPTConfig:
    """The NeMo config of ``arch`` (or a copy of ``base``, e.g. a checkpoint's own config) with
    ``overrides`` (sizes, seq_length, ...) and the run's precision and layout applied."""
    if base is None and arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"model.precision: {precision!r} is not one of {sorted(PRECISION_DTYPES)}")
    config_cls = type(base) if base is not None else ARCHITECTURES[arch]
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
    config = dataclasses.replace(base, **values) if base is not None else config_cls(**values)
    return apply_cpu_model_overrides(config) if on_cpu else config


def checkpoint_gpt_config(checkpoint: str) -> llm.GPTConfig:
    """The GPT config stored in a NeMo 2 checkpoint's ``context/`` (architecture and sizes)."""
    from nemo.lightning import io

    try:
        config = io.load_context(str(checkpoint), subpath="model.config")
    except Exception as err:  # NeMo raises several types for a missing or foreign context
        raise ValueError(f"model.init_from: cannot read the model config of {checkpoint}/context ({err})") from err
    if not isinstance(config, llm.GPTConfig):
        raise ValueError(f"model.init_from: {checkpoint} holds a {type(config).__name__}, not a NeMo GPT config")
    return config


def make_gpt_config(cfg: DictConfig, on_gpu: bool):
    """The NeMo GPT config of the run: the preset's (tiny, the architecture's own, or the one stored
    in ``model.init_from``), with ``model.config`` overrides, precision and layout."""
    # the memory keys first, so that an explicit model.config.<field> still wins
    overrides = {**memory.transformer_fields(cfg.model), **model_config_overrides(cfg)}
    try:
        base = checkpoint_gpt_config(cfg.model.init_from) if cfg.model.preset == "checkpoint" else None
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # A checkpoint keeps its own context length (an export's max_position_embeddings; vLLM refuses longer
    # prompts), not the training crop: SmolLM2 trained at max_length 160 was exported as a 160-token model.
    overrides.setdefault("seq_length", max(cfg.data.max_length, getattr(base, "seq_length", 0) or 0))
    shape = {name: getattr(base if base is not None else ARCHITECTURES.get(cfg.model.arch), name, None)
             for name in ("num_layers", "num_attention_heads", "num_query_groups")}
    shape.update({name: value for name, value in overrides.items() if name in shape})
    check_layout_fits(shape, cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size)
    return build_gpt_config(
        cfg.model.arch,
        overrides,
        base=base,
        precision=cfg.model.precision,
        tensor_parallel=cfg.model.tensor_model_parallel_size,
        pipeline_parallel=cfg.model.pipeline_model_parallel_size,
        context_parallel=cfg.model.context_parallel_size,
        on_cpu=not on_gpu,
    )


def check_layout_fits(shape: dict[str, Any], tensor_parallel: int, pipeline_parallel: int) -> None:
    """The check the config validation makes from known shapes, for a shape read from a checkpoint:
    a ConfigError naming the key here, where megatron would fail with a traceback."""
    for field_name in ("num_attention_heads", "num_query_groups"):
        count = shape.get(field_name)
        if isinstance(count, int) and count and count % tensor_parallel:
            raise ConfigError(f"model.tensor_model_parallel_size: {tensor_parallel} does not divide the "
                              f"model's {field_name}={count}")
    layers = shape.get("num_layers")
    if isinstance(layers, int) and layers and pipeline_parallel > layers:
        raise ConfigError(f"model.pipeline_model_parallel_size: {pipeline_parallel} stages exceed the "
                          f"model's {layers} layers")
