"""The memory plan's LoRA terms and parameter counts against hand counts and transformers' models
(the full fine-tuning plan is checked in tests/cluster/test_recipes.py, the static part of both
against a run's memory.json in tests/training/test_lora.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nemo_dft.training.memory_plan import (
    Layout,
    ModelShape,
    lora_adapters,
    memory_per_gpu,
    padded_vocab,
    parameter_count,
)
from nemo_dft.training.throughput import ModelShape as LinearShapes

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# Mistral-7B-v0.1 (its HF config.json): 32 layers, hidden 4096, 32 heads of 128, 8 KV heads, ffn 14336
MISTRAL_LINEARS = LinearShapes(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                               num_query_groups=8, kv_channels=128, vocab_size=32000, gated_mlp=True).linear_shapes()
MISTRAL_PARAMETERS = 7_241_732_096


def mistral_layout(**changes) -> Layout:
    values = {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 4, "micro_batch_prompts": 2,
              "sequences_per_prompt": 3, "sequence_length": 1024, "micro_batches_per_step": 16,
              "frozen_reference": True, "sequence_parallel": True}
    return Layout(**{**values, **changes})


def mistral_lora(rank: int = 16, dropout: bool = False) -> ModelShape:
    adapters = lora_adapters(MISTRAL_LINEARS, 32, rank, TARGETS, dropout=dropout)
    return ModelShape(parameters=MISTRAL_PARAMETERS, layers=32, hidden=4096, vocab=32000, adapters=adapters)


def test_lora_static_memory_by_hand():
    """Rank 16 on all four targets: r (n_in + n_out) per adapter, 32 layers, split over TP = 2."""
    adapters = 32 * 16 * ((4096 + 6144) + (4096 + 4096) + (4096 + 2 * 14336) + (14336 + 4096))
    assert adapters == 35_651_584
    parts = memory_per_gpu(mistral_lora(), mistral_layout(distributed_optimizer=True))
    per_rank = adapters / 2
    assert parts["weights"] == (MISTRAL_PARAMETERS / 2 + per_rank) * 2  # bf16 base and adapters
    assert parts["gradients"] == per_rank * 4  # fp32 buffers, adapters only
    assert parts["main_weights"] == per_rank * 4 / 4 and parts["optimizer_moments"] == per_rank * 8 / 4
    assert parts["reference"] == 0  # the adapter-free reference needs no copy


def test_lora_activations_by_hand():
    """Per layer and token of a sequence, 2 bytes: the norms' outputs (h, whole on each TP rank) into
    A of QKV and fc1, the attention output (q / TP) and the MLP's hidden (f / TP) into A of proj and
    fc2, and r for each B; 32 layers x 6 sequences x 1024 tokens."""
    full = mistral_layout()
    per_token = 2 * (4096 + 4096 + (4096 + 14336) / 2 + 4 * 16)
    parts = memory_per_gpu(mistral_lora(), full)
    assert parts["adapter_activations"] == 32 * 6 * 1024 * per_token
    without = memory_per_gpu(ModelShape(MISTRAL_PARAMETERS, 32, 4096, 32000), full)
    assert parts["activations"] == without["activations"] and "adapter_activations" not in without
    # dropout keeps a 1-byte mask of each adapter's output: QKV and fc1 split over TP, proj and fc2 h
    # split over TP by sequence parallelism
    masks = (6144 + 2 * 14336) / 2 + (4096 + 4096) / 2
    dropped = memory_per_gpu(mistral_lora(dropout=True), full)
    assert dropped["adapter_activations"] == 32 * 6 * 1024 * (per_token + masks)
    # full recomputation keeps one layer's
    recomputed = memory_per_gpu(mistral_lora(), mistral_layout(recompute="full"))
    assert recomputed["adapter_activations"] == 6 * 1024 * per_token


def test_lora_targets_and_rank():
    only_fc2 = lora_adapters(MISTRAL_LINEARS, 2, 8, ("linear_fc2",))
    assert only_fc2.parameters == 2 * 8 * (14336 + 4096)
    assert (only_fc2.replicated_inputs, only_fc2.split_inputs, only_fc2.intermediates) == (0, 14336, 8)


def hf_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_parameter_count_matches_transformers(family):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms (with heads x head size != hidden) are counted."""
    import transformers

    common = {"vocab_size": 256, "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    head_dim = {"mistral": 24, "qwen2": 24, "qwen3": 40}[family]
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[family]
    extra = {"head_dim": head_dim} if family != "qwen2" else {}
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common, **extra))
    gpt = SimpleNamespace(hidden_size=96, num_layers=3, kv_channels=head_dim, num_attention_heads=4,
                          num_query_groups=2, gated_linear_unit=True, ffn_hidden_size=160,
                          share_embeddings_and_output_weights=False, add_qkv_bias=family == "qwen2",
                          qk_layernorm=family == "qwen3")
    assert parameter_count(gpt, 256) == hf_count(model)


def test_vocabulary_padding():
    gpt = SimpleNamespace(vocab_size=None, make_vocab_size_divisible_by=128, tensor_model_parallel_size=4)
    assert padded_vocab(gpt, None) == 32256 and padded_vocab(gpt, 512) == 512
    gpt.vocab_size = 151936  # a preset's own size is NeMo's output layer as is
    assert padded_vocab(gpt, None) == 151936
    assert padded_vocab(gpt, 128256) == 128512  # a tokenizer's (--vocab) is padded: 128 x TP = 512 divides 128512
