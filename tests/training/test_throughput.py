"""The FLOPs formula against a hand count and against torch's FLOP counter on an HF model of the
same shape; the device peak table; the throughput record."""

from __future__ import annotations

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
