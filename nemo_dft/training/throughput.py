"""Model FLOPs of a DFT step, TFLOP/s per device and MFU.

The FLOPs formula (dense decoder, matrix multiplications only, 2 FLOPs per multiply-add, attention
over the full padded length with no discount for the causal mask, as in Megatron's classic count).
For a micro-batch of R sequences padded to S positions, with h = hidden_size, f = ffn_hidden_size,
q = num_attention_heads * kv_channels, k = num_query_groups * kv_channels, V = padded vocabulary
and L layers, one forward pass costs

    forward = L * [ 2RS h (q + 2k)          QKV projections
                  + 4RS^2 q                  scores Q K^T and their product with V
                  + 2RS q h                  attention output projection
                  + 2RS h f (3 if gated else 2) ] MLP (SwiGLU: two input matrices and one output)
              + 2RS h V                      output layer (logits)

i.e. ``linear * RS + quadratic * RS^2`` summed over the micro-batches of the step: W, the products
with weight matrices (every term but the scores), plus A, the attention products (4RS^2 q a layer).

Full fine-tuning: a backward pass costs twice its forward (activation and weight gradients), so
the policy costs 3 (W + A).

LoRA (``peft.scheme=lora``, rank r): each adapted layer of shape (n_in, n_out) -- linear_qkv
(h, q + 2k), linear_proj (q, h), linear_fc1 (h, 2f gated or f), linear_fc2 (f, h) -- adds its
adapter B A x, 2RS r (n_in + n_out) FLOPs a layer; D is their sum over the targets and layers.  The
base weights are frozen, so the backward computes the activation gradients through them (as much
as their forward, W) but no weight gradients; the attention products still cost 2A and the
adapters 2D (their weight and input gradients).  The policy costs

    forward (W + A + D) + backward (W + 2A + 2D) = 2W + 3A + 3D.

Every layer is counted alike (model FLOPs), although autograd computes no input gradient for a
frozen product whose input depends on no adapter: in the first layer, each one up to and including
the first adapted layer (with the default targets only the first QKV projection's, 2RS h (q + 2k),
under 0.2 % of a Mistral-7B LoRA step).

The reference forward scores the m negative rows of each prompt (the share m / (1 + m) of the
rows) when it runs on the fly (dft.reference=frozen, not ref_free): a frozen copy in full
fine-tuning, the same model with its adapters off under LoRA, both W + A over those rows; an
offline reference costs nothing in the step.  So

    step = 3 (W + A) + reference * m / (1 + m) * (W + A)          full fine-tuning
    step = 2W + 3A + 3D + reference * m / (1 + m) * (W + A)       LoRA

Padding positions are counted: they are computed.

Neglected, as everything but matrix products (norms, softmax, rotary embedding, activation
function, residual adds, LoRA's scale and add): Qwen2's q/k/v biases, q + 2k adds a token and
layer against 2h (q + 2k) for the projection itself (a share of 1 / 2h), and Qwen3's per-head q/k
RMSNorm, a few FLOPs per element of q and k; both are O(h) per token and layer against O(h^2) for
the products, under 1e-4 of a Qwen2.5-7B or Qwen3-8B forward (tests/training/test_throughput.py
counts them by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets; SXM boards unless named.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
}


@dataclass(frozen=True)
class LoRAShape:
    """The adapters of a LoRA run: their rank and the linear layers they adapt in every layer."""

    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # padded, as the output layer has it
    gated_mlp: bool

    @classmethod
    def from_gpt_config(cls, config, vocab_size: int) -> ModelShape:
        """From a NeMo GPT config and the tokenizer's vocabulary, padded as NeMo pads it; a config
        with its own ``vocab_size`` (NeMo's Qwen presets) keeps that one, as NeMo does."""
        heads = config.num_attention_heads
        multiple = (getattr(config, "make_vocab_size_divisible_by", 128) or 1) * config.tensor_model_parallel_size
        preset_vocab = getattr(config, "vocab_size", None)
        return cls(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size or 4 * config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=config.num_query_groups or heads,
            kv_channels=config.kv_channels or config.hidden_size // heads,
            vocab_size=preset_vocab or -(-vocab_size // multiple) * multiple,
            gated_mlp=bool(config.gated_linear_unit),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear layer of a transformer layer, under NeMo's names."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.kv_channels
        k = self.num_query_groups * self.kv_channels
        return {"linear_qkv": (h, q + 2 * k), "linear_proj": (q, h),
                "linear_fc1": (h, 2 * f if self.gated_mlp else f), "linear_fc2": (f, h)}

    def forward_coefficients(self) -> tuple[float, float]:
        """(FLOPs per padded token, FLOPs per padded token pair) of one forward pass."""
        per_layer = sum(2 * n_in * n_out for n_in, n_out in self.linear_shapes().values())
        linear = self.num_layers * per_layer + 2 * self.hidden_size * self.vocab_size
        quadratic = self.num_layers * 4 * self.num_attention_heads * self.kv_channels
        return float(linear), float(quadratic)

    def adapter_coefficient(self, lora: LoRAShape) -> float:
        """Forward FLOPs per padded token of all LoRA adapters: 2 r (n_in + n_out) per adapted layer."""
        shapes = self.linear_shapes()
        return float(self.num_layers * sum(2 * lora.rank * sum(shapes[name]) for name in lora.targets))

    def forward_flops(self, tokens: float, token_pairs: float) -> float:
        """Forward FLOPs of micro-batches with ``tokens`` = sum of R*S and ``token_pairs`` = sum of R*S^2."""
        linear, quadratic = self.forward_coefficients()
        return linear * tokens + quadratic * token_pairs


def step_flops(shape: ModelShape, tokens: float, token_pairs: float, reference_forward: bool,
               reference_share: float = 1.0, lora: LoRAShape | None = None) -> float:
    """Model FLOPs of one DFT optimizer step (all ranks together); see the module docstring.
    ``reference_share``: the share of the rows the reference scores (m / (1 + m): negatives only);
    ``lora``: the adapters of a LoRA run (None: full fine-tuning)."""
    linear, quadratic = shape.forward_coefficients()
    weights, attention = linear * tokens, quadratic * token_pairs
    if lora is None:
        policy = 3 * (weights + attention)
    else:  # frozen weights: activation gradients only
        policy = 2 * weights + 3 * attention + 3 * shape.adapter_coefficient(lora) * tokens
    return policy + int(reference_forward) * reference_share * (weights + attention)


def peak_tflops(device_name: str | None, precision: str, fp8: str | None) -> float | None:
    """The device's dense peak for the run's math (bf16/fp16 or FP8); None where unknown (CPU, fp32,
    a device not in the table)."""
    if not device_name:
        return None
    kind = "fp8" if fp8 else "bf16" if precision in ("bf16", "fp16") else None
    if kind is None:
        return None
    for name, peaks in PEAK_TFLOPS.items():  # the more specific names come first
        if name in device_name:
            return peaks.get(kind)
    return None


@dataclass
class Throughput:
    """Per-step throughput numbers for metrics.jsonl and the progress bar."""

    shape: ModelShape
    reference_forward: bool
    world_size: int
    peak: float | None  # TFLOP/s per device
    reference_share: float = 1.0  # rows the reference scores / rows the policy scores
    lora: LoRAShape | None = None  # the adapters of a LoRA run; None: full fine-tuning

    def measure(self, real_tokens: float, tokens: float, token_pairs: float, seconds: float) -> dict[str, float | None]:
        flops = step_flops(self.shape, tokens, token_pairs, self.reference_forward, self.reference_share, self.lora)
        tflops = flops / seconds / self.world_size / 1e12
        return {
            "tokens_per_s": real_tokens / seconds,
            "processed_tokens_per_s": tokens / seconds,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }


def for_run(cfg, gpt_config, vocab_size: int, on_gpu: bool) -> Throughput:
    """The throughput meter of a training run: its model shape, adapters, reference mode, devices and peak."""
    device = None
    if on_gpu:
        import torch

        device = torch.cuda.get_device_name()
    return Throughput(
        shape=ModelShape.from_gpt_config(gpt_config, vocab_size),
        reference_forward=not cfg.dft.ref_free and cfg.dft.reference == "frozen",
        world_size=cfg.trainer.devices * cfg.trainer.num_nodes,
        peak=peak_tflops(device, cfg.model.precision, cfg.model.fp8),
        reference_share=cfg.dft.num_negatives / (1 + cfg.dft.num_negatives),  # negatives only
        lora=lora_shape(cfg),
    )


def lora_shape(cfg) -> LoRAShape | None:
    """The run's adapters (``peft.*``), or None for full fine-tuning."""
    if cfg.peft.scheme != "lora":
        return None
    return LoRAShape(rank=int(cfg.peft.dim), targets=tuple(cfg.peft.target_modules))
