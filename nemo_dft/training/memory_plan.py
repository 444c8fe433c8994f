"""Per-GPU memory of a training layout, computed before anything is queued.

Bytes per parameter of this rank's shard (P / (TP x PP)):
  weights        2 (bf16/fp16) or 4 (fp32)
  gradients      4 (fp32 buffer, model.grad_reduce_in_fp32) or the weights' size
  main weights   4, only in bf16/fp16 (fp32 copies the optimizer steps); / DP with the distributed optimizer
  Adam moments   8; / DP with the distributed optimizer
  reference      the weights' size again for the frozen on-the-fly reference; 0 offline or DFT2
Activations per micro-batch of S = micro_batch_size x (1 + m) sequences of s tokens, hidden h,
L / PP layers on this stage, with flash attention (the s x s scores are not kept):
  no recomputation       s h (10 + 24 / TP) bytes per layer and sequence; 34 s h / TP with sequence parallelism
  selective recompute    the same (what it drops, the attention scores, flash attention never keeps)
  full recompute         2 s h (/ TP with sequence parallelism) per layer, plus one layer's full activations
  logits                 S s V / TP x 6 bytes (the logits and their fp32 log-softmax)
The first pipeline stage keeps min(PP, micro-batches) micro-batches in flight (1F1B).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layers: int
    hidden: int
    vocab: int


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_prompts: int
    sequences_per_prompt: int  # 1 + m
    sequence_length: int
    micro_batches_per_step: int
    precision: str = "bf16"
    distributed_optimizer: bool = False
    grad_reduce_in_fp32: bool = True
    frozen_reference: bool = False
    recompute: str | None = None  # None | full | selective
    sequence_parallel: bool = False


def memory_per_gpu(shape: ModelShape, layout: Layout) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring), and their total."""
    shard = shape.parameters / (layout.tensor_parallel * layout.pipeline_parallel)
    weight_bytes = 4 if layout.precision == "fp32" else 2
    sharding = layout.data_parallel if layout.distributed_optimizer else 1
    parts = {
        "weights": shard * weight_bytes,
        "gradients": shard * (4 if layout.grad_reduce_in_fp32 else weight_bytes),
        "main_weights": 0.0 if layout.precision == "fp32" else shard * 4 / sharding,
        "optimizer_moments": shard * 8 / sharding,
        "reference": shard * weight_bytes if layout.frozen_reference else 0.0,
    }
    tp, s, h = layout.tensor_parallel, layout.sequence_length, shape.hidden
    sequences = layout.micro_batch_prompts * layout.sequences_per_prompt
    layers = shape.layers / layout.pipeline_parallel
    full_layer = s * h * (34 / tp if layout.sequence_parallel else 10 + 24 / tp)
    if layout.recompute == "full":
        per_layer = 2 * s * h / (tp if layout.sequence_parallel else 1)
        stage = layers * per_layer + full_layer
    else:
        stage = layers * full_layer
    in_flight = min(layout.pipeline_parallel, layout.micro_batches_per_step)
    parts["activations"] = stage * sequences * in_flight
    parts["logits"] = sequences * s * shape.vocab / tp * 6
    parts["total"] = sum(parts.values())
    return parts


def format_plan(parts: dict[str, float], gpu_gb: float) -> str:
    rows = [f"  {name:<18} {value / GB:8.1f} GB" for name, value in parts.items() if name != "total"]
    total = parts["total"] / GB
    verdict = "fits" if total <= gpu_gb else "does NOT fit"
    return "\n".join(rows + [f"  {'total':<18} {total:8.1f} GB of {gpu_gb:g} GB: {verdict}"])
