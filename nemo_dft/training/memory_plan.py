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

LoRA (peft.scheme=lora, rank r): the base weights are frozen in the training dtype and get no
gradients, main weights or Adam moments; the adapters (r (n_in + n_out) parameters for each adapted
linear layer of n_in inputs and n_out outputs, split over TP like their layer) get weights,
gradients, main weights and moments at the bytes above.  There is no reference copy: the reference
is the same model with its adapters off.  Activations are those above plus, per layer, sequence and
token, in 2 bytes, what the adapters keep for their backward (NeMo's ParallelLinearAdapter):
  the input of A         whole on every TP rank for linear_qkv and linear_fc1 (h each: the norm's
                         output, gathered under sequence parallelism), split over TP for linear_proj
                         (q) and linear_fc2 (f)
  the input of B         r for each adapter (A's output, gathered)
  dropout (peft.dropout > 0) a 1-byte mask per adapter output: split over TP for linear_qkv and
                         linear_fc1, h for linear_proj and linear_fc2 (/ TP with sequence parallelism)
This is an upper bound: a frozen linear layer keeps no input of its own (megatron's and Transformer
Engine's only keep it for the weight gradient), so the inputs of A partly replace activations the
terms above count.  Under full recomputation one layer's adapter activations are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GB = 1e9
# LoRA targets whose base layer is row-parallel (its input split over TP ranks); the others, linear_qkv
# and linear_fc1, are column-parallel and take the whole normalised hidden state on every rank.
ROW_PARALLEL_TARGETS = ("linear_proj", "linear_fc2")
ADAPTER_ACTIVATION_BYTES = 2  # 16-bit activations, as the counts above


@dataclass(frozen=True)
class Adapters:
    """LoRA's adapters: parameters over all layers and TP ranks; widths per layer and token."""

    parameters: int
    replicated_inputs: int  # inputs of A on column-parallel layers: whole on every TP rank
    split_inputs: int  # inputs of A on row-parallel layers: split over TP
    intermediates: int  # inputs of B (A's gathered output, r wide each)
    split_outputs: int  # outputs on column-parallel layers, split over TP (dropout masks)
    hidden_outputs: int  # outputs on row-parallel layers, whole (split over TP with sequence parallelism)
    dropout: bool = False

    def bytes_per_token(self, tensor_parallel: int, sequence_parallel: bool) -> float:
        """Activation bytes one layer's adapters keep per token of a sequence (module docstring)."""
        kept = self.replicated_inputs + self.split_inputs / tensor_parallel + self.intermediates
        masks = 0.0
        if self.dropout:
            masks = self.split_outputs / tensor_parallel + self.hidden_outputs / (
                tensor_parallel if sequence_parallel else 1)
        return kept * ADAPTER_ACTIVATION_BYTES + masks


def lora_adapters(linear_shapes: dict[str, tuple[int, int]], layers: int, rank: int, targets: tuple[str, ...],
                  dropout: bool = False) -> Adapters:
    """The adapters of rank ``rank`` on ``targets`` of every layer, from each linear layer's
    (inputs, outputs) (``nemo_dft.training.throughput.ModelShape.linear_shapes``)."""
    row = [linear_shapes[t] for t in targets if t in ROW_PARALLEL_TARGETS]
    column = [linear_shapes[t] for t in targets if t not in ROW_PARALLEL_TARGETS]
    return Adapters(
        parameters=layers * sum(rank * (n_in + n_out) for n_in, n_out in row + column),
        replicated_inputs=sum(n_in for n_in, _ in column),
        split_inputs=sum(n_in for n_in, _ in row),
        intermediates=rank * len(targets),
        split_outputs=sum(n_out for _, n_out in column),
        hidden_outputs=sum(n_out for _, n_out in row),
        dropout=dropout,
    )


@dataclass(frozen=True)
class ModelShape:
    parameters: int  # the base model's (without adapters)
    layers: int
    hidden: int
    vocab: int
    adapters: Adapters | None = None  # LoRA; None: full fine-tuning


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
    frozen_reference: bool = False  # scored on the fly: a copy in full fine-tuning, the adapters off under LoRA
    recompute: str | None = None  # None | full | selective
    sequence_parallel: bool = False


def static_memory(shape: ModelShape, layout: Layout) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, main weights, Adam moments and the reference copy."""
    model_parallel = layout.tensor_parallel * layout.pipeline_parallel
    shard = shape.parameters / model_parallel
    adapters = shape.adapters.parameters / model_parallel if shape.adapters else 0.0
    trainable = adapters if shape.adapters else shard
    weight_bytes = 4 if layout.precision == "fp32" else 2
    sharding = layout.data_parallel if layout.distributed_optimizer else 1
    copy = layout.frozen_reference and shape.adapters is None
    return {
        "weights": (shard + adapters) * weight_bytes,
        "gradients": trainable * (4 if layout.grad_reduce_in_fp32 else weight_bytes),
        "main_weights": 0.0 if layout.precision == "fp32" else trainable * 4 / sharding,
        "optimizer_moments": trainable * 8 / sharding,
        "reference": shard * weight_bytes if copy else 0.0,
    }


def memory_per_gpu(shape: ModelShape, layout: Layout) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring), and their total."""
    parts = static_memory(shape, layout)
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
    if shape.adapters is not None:
        adapter_layer = s * shape.adapters.bytes_per_token(tp, layout.sequence_parallel)
        kept_layers = 1 if layout.recompute == "full" else layers
        parts["adapter_activations"] = kept_layers * adapter_layer * sequences * in_flight
    parts["logits"] = sequences * s * shape.vocab / tp * 6
    parts["total"] = sum(parts.values())
    return parts


def parameter_count(gpt: Any, vocab: int) -> int:
    """Parameters of a NeMo GPT config: attention (GQA; Qwen2's q/k/v biases, Qwen3's per-head q/k
    RMSNorm weights), the MLP (gated: 3 matrices), two RMSNorms a layer, embeddings, final norm."""
    h, layers = gpt.hidden_size, gpt.num_layers
    head_dim = gpt.kv_channels or h // gpt.num_attention_heads
    groups = gpt.num_query_groups or gpt.num_attention_heads
    q, k = gpt.num_attention_heads * head_dim, groups * head_dim
    attention = h * q * 2 + h * 2 * k
    attention += (q + 2 * k) * bool(getattr(gpt, "add_qkv_bias", False))
    attention += 2 * head_dim * bool(getattr(gpt, "qk_layernorm", False))
    mlp = (3 if gpt.gated_linear_unit else 2) * h * gpt.ffn_hidden_size
    embeddings = vocab * h * (1 if gpt.share_embeddings_and_output_weights else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


def padded_vocab(gpt: Any, vocab: int | None) -> int:
    """The output layer's vocabulary as NeMo builds it: a config's own ``vocab_size`` as is (Qwen's
    presets), otherwise ``vocab`` (default 32000, Mistral/Llama-2) padded to a multiple of
    make_vocab_size_divisible_by x TP."""
    if vocab is None and getattr(gpt, "vocab_size", None):
        return int(gpt.vocab_size)
    multiple = (getattr(gpt, "make_vocab_size_divisible_by", 128) or 1) * gpt.tensor_model_parallel_size
    return -(-(vocab or 32000) // multiple) * multiple


def plan_for_run(cfg: Any, gpt: Any, vocab: int | None = None) -> tuple[ModelShape, Layout]:
    """The model shape and layout of a training config (``gpt``: its NeMo GPT config)."""
    from nemo_dft.config.training import data_parallel_size, uses_pack_length
    from nemo_dft.training.throughput import ModelShape as LinearShapes
    from nemo_dft.training.throughput import lora_shape

    vocab = padded_vocab(gpt, vocab)
    lora = lora_shape(cfg)
    adapters = None
    if lora is not None:
        linears = LinearShapes.from_gpt_config(gpt, vocab).linear_shapes()
        adapters = lora_adapters(linears, gpt.num_layers, lora.rank, lora.targets, dropout=cfg.peft.dropout > 0)
    shape = ModelShape(parameters=parameter_count(gpt, vocab), layers=gpt.num_layers, hidden=gpt.hidden_size,
                       vocab=vocab, adapters=adapters)
    m, dp = cfg.model, data_parallel_size(cfg)
    # a micro-batch: micro_batch_size groups of 1 + m sequences padded to max_length (a packed row of
    # the same groups is no longer), or with data.pack_length one row of pack_length positions, at most
    # one row per prompt of the step
    rows = uses_pack_length(cfg)
    layout = Layout(
        tensor_parallel=m.tensor_model_parallel_size, pipeline_parallel=m.pipeline_model_parallel_size,
        data_parallel=dp, micro_batch_prompts=1 if rows else m.micro_batch_size,
        sequences_per_prompt=1 if rows else 1 + cfg.dft.num_negatives,
        sequence_length=cfg.data.pack_length if rows else cfg.data.max_length,
        micro_batches_per_step=m.global_batch_size // (dp if rows else m.micro_batch_size * dp),
        precision=m.precision, distributed_optimizer=m.use_distributed_optimizer,
        grad_reduce_in_fp32=m.grad_reduce_in_fp32,
        frozen_reference=not cfg.dft.ref_free and cfg.dft.reference == "frozen",
        recompute=m.recompute_granularity, sequence_parallel=m.sequence_parallel,
    )
    return shape, layout


def format_plan(parts: dict[str, float], gpu_gb: float) -> str:
    rows = [f"  {name:<19} {value / GB:8.1f} GB" for name, value in parts.items() if name != "total"]
    total = parts["total"] / GB
    verdict = "fits" if total <= gpu_gb else "does NOT fit"
    return "\n".join(rows + [f"  {'total':<19} {total:8.1f} GB of {gpu_gb:g} GB: {verdict}"])
