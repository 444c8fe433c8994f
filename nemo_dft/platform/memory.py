"""The memory features of a Megatron run: the distributed optimizer, overlapped gradient
reduction and parameter gathering, activation recomputation and sequence parallelism.

The ``model.*`` keys are mapped onto megatron-core's own implementations: the DDP config (gradient
buffers, reduce-scatter of gradients, all-gather of parameters), the optimizer config (optimizer
state sharded over data-parallel ranks) and the transformer config (recomputation, sequence
parallelism).  Impossible combinations are rejected here, before anything is built.
"""

from __future__ import annotations

from typing import Any

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def static_errors(model_cfg: Any) -> list[tuple[str, str]]:
    """(key, problem) pairs for memory settings that can be rejected without looking at the machine."""
    errors = []
    m = model_cfg
    if m.overlap_param_gather and not m.use_distributed_optimizer:
        errors.append(("model.overlap_param_gather", "needs model.use_distributed_optimizer=true (it gathers "
                       "the parameters that the distributed optimizer shards)"))
    if m.recompute_granularity is not None and m.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        errors.append(("model.recompute_granularity",
                       f"{m.recompute_granularity!r} is not one of {list(RECOMPUTE_GRANULARITIES)} (or null)"))
    if m.recompute_granularity == "full":
        if m.recompute_method not in RECOMPUTE_METHODS:
            errors.append(("model.recompute_method", f"full recomputation needs one of {list(RECOMPUTE_METHODS)}, "
                           f"got {m.recompute_method!r}"))
        if m.recompute_num_layers is None or m.recompute_num_layers < 1:
            errors.append(("model.recompute_num_layers", "full recomputation needs a number of layers >= 1 "
                           "(uniform: layers per recomputed chunk; block: layers recomputed per pipeline stage)"))
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        errors.append(("model.recompute_method", "recompute_method and recompute_num_layers apply only to "
                       "model.recompute_granularity=full"))
    if m.sequence_parallel and m.tensor_model_parallel_size < 2:
        errors.append(("model.sequence_parallel", "splits activations over tensor-parallel ranks; it needs "
                       "model.tensor_model_parallel_size >= 2"))
    return errors


def check_sequence_parallel_supported(model_cfg: Any, on_gpu: bool) -> None:
    """Sequence parallelism of RMSNorm models needs Transformer Engine's norm (megatron's torch norm
    refuses it, and apex is not part of this stack); raise ValueError naming the key otherwise."""
    if not model_cfg.sequence_parallel:
        return
    if not on_gpu:
        raise ValueError("model.sequence_parallel: needs Transformer Engine on a GPU; this run has no GPU")
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ValueError("model.sequence_parallel: needs Transformer Engine, which is not importable here "
                         f"({err})") from err


def transformer_fields(model_cfg: Any) -> dict[str, Any]:
    """Fields of megatron's TransformerConfig (NeMo's GPT config) that the memory keys set."""
    return {
        "recompute_granularity": model_cfg.recompute_granularity,
        "recompute_method": model_cfg.recompute_method if model_cfg.recompute_granularity == "full" else None,
        "recompute_num_layers": model_cfg.recompute_num_layers if model_cfg.recompute_granularity == "full" else None,
        "sequence_parallel": bool(model_cfg.sequence_parallel),
    }


def ddp_config(model_cfg: Any):
    """megatron-core's DDP config of a training run (gradient buffers and their reduction)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=model_cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=model_cfg.overlap_grad_reduce,
        overlap_param_gather=model_cfg.overlap_param_gather,
        use_distributed_optimizer=model_cfg.use_distributed_optimizer,
    )
