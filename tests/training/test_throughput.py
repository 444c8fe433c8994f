"""The FLOPs formula against a hand count and against torch's FLOP counter on HF models of the
same shapes (Mistral, Qwen2, Qwen3) and on the megatron model with LoRA adapters; the device peak
table; the throughput record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_dft.demo.tiny_model import TINY_MISTRAL_SHAPE, TINY_VOCAB_SIZE
from nemo_dft.training.throughput import ModelShape, Throughput, peak_tflops, step_flops

TINY = ModelShape(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
                  kv_channels=32, vocab_size=512, gated_mlp=True)


def test_tiny_shape_is_the_demo_model():
    assert TINY_MISTRAL_SHAPE["num_layers"] == TINY.num_layers and TINY_VOCAB_SIZE == TINY.vocab_size
    assert TINY_MISTRAL_SHAPE["ffn_hidden_size"] == TINY.ffn_hidden_size


def test_forward_flops_match_a_hand_count_of_the_tiny_model():
    rows, width = 3, 10  # one micro-batch: 3 sequences padded to 10 positions
    n = rows * width
    matmuls_per_layer = [  # (rows of the left operand, inner size, columns), for every product in a layer
        (n, 128, 4 * 32),  # Q
        (n, 128, 2 * 32),  # K
        (n, 128, 2 * 32),  # V
        *[(width, 32, width)] * (rows * 4),  # Q K^T per sequence and head
        *[(width, width, 32)] * (rows * 4),  # (softmax) V per sequence and head
        (n, 4 * 32, 128),  # attention output
        (n, 128, 384),  # gate
        (n, 128, 384),  # up
        (n, 384, 128),  # down
    ]
    per_layer = sum(2 * a * b * c for a, b, c in matmuls_per_layer)
    by_hand = 2 * per_layer + 2 * n * 128 * 512  # two layers and the output layer
    assert by_hand == 2 * 11_950_080 + 3_932_160
    assert TINY.forward_flops(n, rows * width * width) == by_hand
    assert step_flops(TINY, n, rows * width**2, reference_forward=False) == 3 * by_hand
    assert step_flops(TINY, n, rows * width**2, reference_forward=True) == 4 * by_hand
    # the frozen reference scores the negatives only: m = 2 of every 3 rows
    negatives_only = step_flops(TINY, n, rows * width**2, reference_forward=True, reference_share=2 / 3)
    assert negatives_only == pytest.approx(3 * by_hand + TINY.forward_flops(n * 2 / 3, rows * 2 / 3 * width**2))


@pytest.mark.parametrize("backward", [False, True])
def test_forward_flops_match_torch_flop_counter_on_an_hf_model(backward):
    """Independent count: torch's FLOP counter over an HF Mistral model of the tiny shape (eager
    attention, full S x S scores), fresh random batch shape; the rotary-frequency product is left out."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                           attn_implementation="eager")
    model = MistralForCausalLM(config)
    rows, width = torch.randint(1, 6, ()).item(), torch.randint(4, 40, ()).item()
    ids = torch.randint(512, (rows, width))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        if backward:
            logits.float().logsumexp(-1).sum().backward()
    counts = {name: sum(values.values()) for name, values in counter.get_flop_counts().items()}
    layers = sum(counts[f"MistralForCausalLM.model.layers.{i}"] for i in range(2))
    counted = layers + counts["MistralForCausalLM.lm_head"]
    expected = TINY.forward_flops(rows * width, rows * width * width)
    assert counted == (3 if backward else 1) * expected


def test_shape_from_a_nemo_config_pads_the_vocabulary():
    from types import SimpleNamespace

    config = SimpleNamespace(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                             num_query_groups=2, kv_channels=None, make_vocab_size_divisible_by=128,
                             tensor_model_parallel_size=2, gated_linear_unit=True)
    shape = ModelShape.from_gpt_config(config, vocab_size=300)
    assert shape.vocab_size == 512 and shape.kv_channels == 32


def test_device_peaks():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16", None) == 756.0
    assert peak_tflops("NVIDIA H200", "fp32", "hybrid") == 1979.0
    assert peak_tflops("NVIDIA B200", "bf16", None) == 2250.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16", None) == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", "hybrid") is None  # no FP8 on A100
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32", None) is None
    assert peak_tflops(None, "bf16", None) is None


def test_throughput_record():
    meter = Throughput(TINY, reference_forward=True, world_size=2, peak=989.0)
    record = meter.measure(real_tokens=20, tokens=30, token_pairs=300, seconds=0.5)
    assert record["tokens_per_s"] == 40 and record["processed_tokens_per_s"] == 60
    assert record["tflops_per_device"] == pytest.approx(4 * TINY.forward_flops(30, 300) / 0.5 / 2 / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 989.0)
    assert Throughput(TINY, False, 1, None).measure(1, 1, 1, 1.0)["mfu"] is None


ALL_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def tiny_products(n: int, rows: int, width: int) -> dict[str, list[tuple[int, int, int]]]:
    """Every matrix product of one forward pass of the tiny model, (rows of the left operand, inner
    size, columns), grouped: each linear layer of a transformer layer, its attention, the logits."""
    return {
        "linear_qkv": [(n, 128, 4 * 32 + 2 * 2 * 32)],
        "attention": [(width, 32, width)] * (rows * 4) + [(width, width, 32)] * (rows * 4),
        "linear_proj": [(n, 4 * 32, 128)],
        "linear_fc1": [(n, 128, 2 * 384)],  # gate and up, fused
        "linear_fc2": [(n, 384, 128)],
        "logits": [(n, 128, 512)],
    }


def flops(products) -> int:
    return sum(2 * a * b * c for a, b, c in products)


def input_gradient(products):
    """dX = dY W^T of X W: (rows, columns, inner)."""
    return [(a, c, b) for a, b, c in products]


def weight_gradient(products):
    """dW = X^T dY of X W: (inner, rows, columns)."""
    return [(b, a, c) for a, b, c in products]


def attention_gradients(width: int, rows: int):
    """Q K^T and P V per sequence and head: dQ = dS K, dK = dS^T Q, dP = dO V^T, dV = P^T dO."""
    per_head = [(width, width, 32), (width, width, 32), (width, 32, width), (width, width, 32)]
    return per_head * (rows * 4)


def adapter_products(n: int, rank: int, target: str) -> list[tuple[int, int, int]]:
    """A (n_in x r) then B (r x n_out) of the adapter on ``target``."""
    n_in, n_out = {"linear_qkv": (128, 256), "linear_proj": (128, 128), "linear_fc1": (128, 768),
                   "linear_fc2": (384, 128)}[target]
    return [(n, n_in, rank), (n, rank, n_out)]


@pytest.mark.parametrize("targets", [ALL_TARGETS, ("linear_qkv", "linear_fc2")])
def test_lora_step_matches_a_hand_count_of_the_tiny_model(targets):
    """LoRA: frozen products get their input gradients only, adapters both, attention as before;
    the reference is the same model with the adapters off."""
    from nemo_dft.training.throughput import LoRAShape

    rows, width, rank = 3, 10, 4
    n = rows * width
    base = tiny_products(n, rows, width)
    frozen = [p for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2") for p in base[name]]
    frozen = frozen * 2 + base["logits"]  # two layers, then the output layer
    attention = base["attention"] * 2
    adapters = [p for target in targets for p in adapter_products(n, rank, target)] * 2
    forward = flops(frozen) + flops(attention) + flops(adapters)
    backward = (flops(input_gradient(frozen)) + flops(attention_gradients(width, rows)) * 2
                + flops(input_gradient(adapters)) + flops(weight_gradient(adapters)))
    lora = LoRAShape(rank=rank, targets=targets)
    assert step_flops(TINY, n, rows * width**2, reference_forward=False, lora=lora) == forward + backward
    reference = flops(frozen) + flops(attention)  # adapters off, over the m = 2 negatives of 3 rows
    with_reference = step_flops(TINY, n, rows * width**2, reference_forward=True, reference_share=2 / 3, lora=lora)
    assert with_reference == pytest.approx(forward + backward + 2 / 3 * reference)
    if targets == ALL_TARGETS:  # by the numbers: 2 x 11_950_080 + 3_932_160 without adapters (above)
        assert flops(adapters) == 2 * 2 * n * rank * (128 + 256 + 128 + 128 + 128 + 768 + 384 + 128)


MEGATRON_CASE = {"rows": 2, "width": 7, "rank": 2}


@pytest.fixture(scope="module")
def megatron_counts(tmp_path_factory):
    """torch's FLOP counter over one forward and backward pass of the tiny megatron model (local
    spec, CPU): trainable, and with NeMo's adapters on each target set as training applies them."""
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("lora_flops") / "flops.pt"
    case = [str(MEGATRON_CASE[key]) for key in ("rows", "width", "rank")]
    worker = Path(__file__).parent / "workers" / "lora_flops.py"
    torchrun(worker, [str(out), *case, ",".join(ALL_TARGETS), "linear_fc2"], 1)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [ALL_TARGETS, ("linear_fc2",)])
def test_lora_step_matches_torch_flop_counter_on_the_megatron_model(megatron_counts, targets):
    """Independent count.  The counter sees what the formula counts alike but autograd skips: the
    first layer's frozen products whose input depends on no adapter (module docstring)."""
    from nemo_dft.training.throughput import LoRAShape

    rows, width, rank = MEGATRON_CASE["rows"], MEGATRON_CASE["width"], MEGATRON_CASE["rank"]
    n, pairs = rows * width, rows * width**2
    assert megatron_counts["full"] == step_flops(TINY, n, pairs, reference_forward=False)
    counted = megatron_counts[",".join(targets)]
    assert counted["wrapped"] == 2 * len(targets)
    products = tiny_products(n, rows, width)
    if targets == ALL_TARGETS:  # the first QKV projection takes the embeddings' norm: no gradient needed
        skipped = flops(products["linear_qkv"])
    else:  # the whole first attention block, and the MLP's frozen products beside its only adapter
        skipped = flops(products["linear_qkv"]) + 2 * flops(products["attention"]) + flops(
            products["linear_proj"]) + flops(products["linear_fc1"]) + flops(products["linear_fc2"])
    lora = LoRAShape(rank=rank, targets=targets)
    assert counted["flops"] == step_flops(TINY, n, pairs, reference_forward=False, lora=lora) - skipped


# Qwen2.5-7B and Qwen3-8B as published (their HF config.json).
QWEN25_7B = ModelShape(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                       num_query_groups=4, kv_channels=128, vocab_size=152064, gated_mlp=True)
QWEN3_8B = ModelShape(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                      num_query_groups=8, kv_channels=128, vocab_size=151936, gated_mlp=True)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_forward_flops_match_torch_flop_counter(family):
    """Qwen2's biased q/k/v projections count as their products alone (torch counts addmm so) and
    Qwen3's q/k RMSNorm not at all; Qwen3's head size times heads differs from the hidden size here,
    so q = heads x kv_channels, not h, must be used."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = {"vocab_size": 512, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
              "attn_implementation": "eager"}
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        kv_channels = 96 // 4
    else:
        kv_channels = 40
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=kv_channels))
    shape = ModelShape(num_layers=2, hidden_size=96, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                       kv_channels=kv_channels, vocab_size=512, gated_mlp=True)
    rows, width = torch.randint(1, 5, ()).item(), torch.randint(4, 30, ()).item()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(512, (rows, width)))
    counts = {name: sum(values.values()) for name, values in counter.get_flop_counts().items()}
    prefix = type(model).__name__
    counted = sum(counts[f"{prefix}.model.layers.{i}"] for i in range(2)) + counts[f"{prefix}.lm_head"]
    assert counted == shape.forward_flops(rows * width, rows * width * width)


@pytest.mark.parametrize(("shape", "bias", "qk_norm"), [(QWEN25_7B, True, False), (QWEN3_8B, False, True)])
def test_neglected_qwen_terms_are_below_1e4_of_the_forward(shape, bias, qk_norm):
    """Counted by hand per token and layer: one add per q/k/v output for the biases; for the q/k
    RMSNorm a square, a sum, the normalising and the weight multiply per element (4), plus 2 per head."""
    q, k = shape.num_attention_heads * shape.kv_channels, shape.num_query_groups * shape.kv_channels
    heads = shape.num_attention_heads + shape.num_query_groups
    per_token = bias * (q + 2 * k) + qk_norm * (4 * (q + k) + 2 * heads)
    tokens = 1024  # one sequence of the recipes' length
    neglected = shape.num_layers * per_token * tokens
    share = neglected / shape.forward_flops(tokens, tokens * tokens)
    print(f"neglected share {share:.2e}")
    assert 0 < share < 1e-4


def test_shape_of_a_preset_vocabulary_is_not_padded():
    """NeMo's Qwen presets carry their vocabulary size and NeMo builds the output layer with it as is."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                             num_query_groups=8, kv_channels=128, make_vocab_size_divisible_by=128,
                             tensor_model_parallel_size=2, gated_linear_unit=True, vocab_size=151936)
    shape = ModelShape.from_gpt_config(config, vocab_size=151669)
    assert shape == QWEN3_8B


def test_lora_run_meter_counts_the_adapters():
    from types import SimpleNamespace

    from nemo_dft.config.training import load_config
    from nemo_dft.training.throughput import LoRAShape, for_run

    config = SimpleNamespace(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                             num_query_groups=2, kv_channels=32, make_vocab_size_divisible_by=128,
                             tensor_model_parallel_size=1, gated_linear_unit=True, vocab_size=None)
    cfg = load_config(None, ["peft.scheme=lora", "peft.dim=4", "peft.target_modules=[linear_qkv,linear_fc2]",
                             "peft.checkpoint=full"],
                      check_files=False)
    meter = for_run(cfg, config, 512, on_gpu=False)
    assert meter.lora == LoRAShape(rank=4, targets=("linear_qkv", "linear_fc2")) and meter.reference_forward
    assert for_run(load_config(None, [], check_files=False), config, 512, on_gpu=False).lora is None
    record = meter.measure(real_tokens=20, tokens=30, token_pairs=300, seconds=1.0)
    expected = step_flops(TINY, 30, 300, True, 2 / 3, LoRAShape(4, ("linear_qkv", "linear_fc2")))
    assert record["tflops_per_device"] == pytest.approx(expected / 1e12)
