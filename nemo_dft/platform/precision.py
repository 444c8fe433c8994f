"""Compute precision and FP8: the ``model.precision`` / ``model.fp8*`` keys mapped onto NeMo's
``MegatronMixedPrecision`` plugin, which writes them into megatron-core's TransformerConfig.

FP8 runs the transformer layers' GEMMs through Transformer Engine (the TE layer spec, which NeMo's
GPT configs select when TE is importable).  The output layer stays a megatron
``ColumnParallelLinear`` in bf16/fp16, and :func:`nemo_dft.modeling.logprobs.token_logps` casts its logits
to fp32 before the vocab-parallel log-softmax, so the log-probs that feed the DFT loss are fp32
whatever the compute precision.
"""

from __future__ import annotations

from typing import Any

import torch

from nemo_dft.config.loading import ConfigError

PRECISIONS = {  # model.precision -> (Lightning precision, parameter dtype)
    "fp32": ("32", torch.float32),
    "bf16": ("bf16-mixed", torch.bfloat16),
    "fp16": ("16-mixed", torch.float16),
}
FP8_FORMATS = ("hybrid", "e4m3")  # hybrid: e4m3 forward, e5m2 gradients
# Lowest CUDA compute capability of each TE scaling recipe: Ada/Hopper for per-tensor scaling,
# Hopper for blockwise, Blackwell for MXFP8.
FP8_RECIPE_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


class FP8Unavailable(ConfigError):
    """FP8 was requested where Transformer Engine or a capable GPU is missing."""


def static_errors(model_cfg: Any) -> list[tuple[str, str]]:
    """(key, problem) pairs for settings that can be rejected without looking at the machine."""
    errors = []
    if model_cfg.precision not in PRECISIONS:
        errors.append(("model.precision", f"{model_cfg.precision!r} is not one of {sorted(PRECISIONS)}"))
    if model_cfg.fp8 is None:
        return errors
    if model_cfg.fp8 not in FP8_FORMATS:
        errors.append(("model.fp8", f"{model_cfg.fp8!r} is not one of {list(FP8_FORMATS)} (or null)"))
    if model_cfg.fp8_recipe not in FP8_RECIPE_MIN_CAPABILITY:
        errors.append(("model.fp8_recipe", f"{model_cfg.fp8_recipe!r} is not one of {list(FP8_RECIPE_MIN_CAPABILITY)}"))
    if model_cfg.precision not in ("bf16", "fp16"):
        errors.append(("model.fp8", "FP8 needs model.precision bf16 or fp16 (for what TE keeps in higher precision)"))
    if model_cfg.fp8_amax_compute_algo not in ("max", "most_recent"):
        errors.append(("model.fp8_amax_compute_algo", f"{model_cfg.fp8_amax_compute_algo!r} is not max or most_recent"))
    if model_cfg.fp8_amax_history_len < 1:
        errors.append(("model.fp8_amax_history_len", "must be >= 1"))
    return errors


def check_fp8_supported(model_cfg: Any, on_gpu: bool) -> None:
    """Raise :class:`FP8Unavailable` when ``model.fp8`` is set but cannot run on this machine."""
    if model_cfg.fp8 is None:
        return
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise FP8Unavailable(
            "model.fp8: FP8 training needs Transformer Engine, which is not installed "
            "(use the nemo_dft GPU image, or set model.fp8=null)"
        ) from err
    if not on_gpu:
        raise FP8Unavailable("model.fp8: FP8 training needs a CUDA GPU; this run has none (set model.fp8=null)")
    needed = FP8_RECIPE_MIN_CAPABILITY[model_cfg.fp8_recipe]
    capability = torch.cuda.get_device_capability()
    if capability < needed:
        raise FP8Unavailable(
            f"model.fp8_recipe: {model_cfg.fp8_recipe!r} needs compute capability {needed[0]}.{needed[1]} or newer; "
            f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}"
        )


def plugin_arguments(model_cfg: Any) -> dict[str, Any]:
    """Keyword arguments of NeMo's ``MegatronMixedPrecision`` for this run.

    Parameters are kept in the compute dtype, as NeMo's bf16 recipes do; the optimizer holds fp32
    main weights.  ``fp8_param`` stores weights in FP8 for the parameter all-gather.
    """
    precision, dtype = PRECISIONS[model_cfg.precision]
    arguments: dict[str, Any] = {
        "precision": precision,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "autocast_enabled": False,
        "grad_reduce_in_fp32": True,
    }
    if model_cfg.fp8 is not None:
        arguments.update(
            fp8=model_cfg.fp8,
            fp8_recipe=model_cfg.fp8_recipe,
            fp8_amax_history_len=model_cfg.fp8_amax_history_len,
            fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo,
            fp8_param_gather=model_cfg.fp8_param,
        )
    return arguments


def precision_plugin(model_cfg: Any):
    """NeMo's mixed-precision plugin configured from ``model.*``."""
    from nemo import lightning as nl

    return nl.MegatronMixedPrecision(**plugin_arguments(model_cfg))
