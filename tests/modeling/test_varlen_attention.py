"""The local spec's packed core attention (VarlenCoreAttention) against plain-torch attention on
each sequence alone: values and gradients of q, k and v, with GQA, a sliding window, query-key
layer scaling and attention dropout, on fresh random inputs."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_dft.modeling.packed_attention import thd_packed_seq_params
from nemo_dft.modeling.varlen_attention import Segments, VarlenCoreAttention, use_varlen_attention

HEADS, GROUPS, DIM = 4, 2, 16
LENGTHS, WIDTH = [5, 1, 9, 3, 7], 32  # 25 real positions and a tail of 7 padding positions


def local_attention(layer_number=1, window=None, layer_scaling=False, softmax_scale=None, dropout=0.0):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType

    config = TransformerConfig(
        num_layers=4, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=DIM,
        window_size=window, apply_query_key_layer_scaling=layer_scaling, softmax_scale=softmax_scale,
        attention_dropout=dropout, masked_softmax_fusion=False, attention_backend=AttnBackend.local,
        params_dtype=torch.float32, use_cpu_initialization=True)
    tp = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))  # one tensor-parallel rank, no process group
    return DotProductAttention(config, layer_number, AttnMaskType.causal, "self", softmax_scale=softmax_scale,
                               pg_collection=tp)


def separate(q, k, v, scale, window=None, drop=None):
    """Each sequence alone: explicit scores, causal (and window) mask, softmax, (dropout), values."""
    outputs, start = [], 0
    for s, n in enumerate(LENGTHS):
        qs = q[start:start + n].transpose(0, 1)  # [heads, n, dim]
        ks = k[start:start + n].transpose(0, 1).repeat_interleave(HEADS // GROUPS, dim=0)
        vs = v[start:start + n].transpose(0, 1).repeat_interleave(HEADS // GROUPS, dim=0)
        back = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)
        allowed = (back >= 0) if window is None else (back >= 0) & (back <= window[0])
        probs = (qs @ ks.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        if drop is not None:
            probs = probs * drop[s, :, :n, :n]
        outputs.append((probs @ vs).transpose(0, 1).reshape(n, HEADS * DIM))
        start += n
    return torch.cat(outputs)


def inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(WIDTH, HEADS, DIM, generator=generator, requires_grad=True)
    k = torch.randn(WIDTH, GROUPS, DIM, generator=generator, requires_grad=True)
    v = torch.randn(WIDTH, GROUPS, DIM, generator=generator, requires_grad=True)
    return q, k, v, torch.randn(sum(LENGTHS), HEADS * DIM, generator=generator)


def cu_seqlens():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def value_and_grads(fn, q, k, v, weights):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out[:len(weights)] * weights).sum(), (q, k, v))
    return out, grads


CASES = {
    "plain": ({}, 1 / math.sqrt(DIM)),
    "window": ({"window": (2, 0)}, 1 / math.sqrt(DIM)),
    "layer_scaling": ({"layer_number": 3, "layer_scaling": True}, 1 / math.sqrt(DIM)),
    "softmax_scale": ({"softmax_scale": 0.3}, 0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_core_attention_matches_each_sequence_alone(case):
    kwargs, scale = CASES[case]
    module = VarlenCoreAttention(local_attention(**kwargs))
    assert module.scale == pytest.approx(scale)
    q, k, v, weights = inputs(int(torch.randint(0, 2**31, ()).item()))
    real = sum(LENGTHS)
    expected, expected_grads = value_and_grads(
        lambda q, k, v: separate(q, k, v, scale, kwargs.get("window")), q, k, v, weights)
    # the trainer's params (the real sequences' lengths) and megatron's plain THD params (the tail
    # padding one more sequence, the lengths read from cu_seqlens by the module)
    local = thd_packed_seq_params(cu_seqlens(), WIDTH, local=True)
    plain = thd_packed_seq_params(cu_seqlens(), WIDTH)
    for params in (local, plain):
        out, grads = value_and_grads(lambda q, k, v, p=params: module(q, k, v, None, packed_seq_params=p),
                                     q, k, v, weights)
        assert out.shape == (WIDTH, HEADS * DIM)
        torch.testing.assert_close(out[:real], expected, rtol=1e-5, atol=1e-6)
        for got, want, name in zip(grads, expected_grads, "qkv", strict=True):
            torch.testing.assert_close(got[:real], want[:real], rtol=1e-5, atol=1e-6, msg=name)
            assert torch.all(got[real:] == 0), f"{name}: the tail padding got a gradient"
    assert torch.all(module(q, k, v, None, packed_seq_params=local)[real:] == 0)  # zeros, not attended padding


def test_attention_dropout_acts_on_each_sequences_probabilities(monkeypatch):
    """With dropout in training the probabilities are formed explicitly and the wrapped module's
    dropout applies to them inside megatron's RNG-tracker fork; fixed masks stand in for it."""
    from megatron.core import tensor_parallel

    p = 0.4
    module = VarlenCoreAttention(local_attention(dropout=p))
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    keep = (torch.rand(len(LENGTHS), HEADS, max(LENGTHS), max(LENGTHS), generator=generator) > p).float() / (1 - p)
    forks = []

    class Tracker:
        def fork(self):
            forks.append(1)
            return contextlib.nullcontext()

    class FixedDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = p

        def forward(self, probs):  # one call per sequence, in the row's order
            assert forks, "dropout ran outside the RNG tracker's fork"
            n = probs.shape[-1]
            return probs * keep[len(forks) - 1, :, :n, :n]  # probs: [1, heads, n, n]

    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", Tracker)
    module.local.attention_dropout = FixedDropout()
    q, k, v, weights = inputs(int(torch.randint(0, 2**31, ()).item()))
    params = thd_packed_seq_params(cu_seqlens(), WIDTH, local=True)
    out, grads = value_and_grads(lambda q, k, v: module(q, k, v, None, packed_seq_params=params), q, k, v, weights)
    assert len(forks) == len(LENGTHS)
    expected, expected_grads = value_and_grads(
        lambda q, k, v: separate(q, k, v, 1 / math.sqrt(DIM), drop=keep), q, k, v, weights)
    torch.testing.assert_close(out[:sum(LENGTHS)], expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    module.eval()  # no dropout in evaluation: the SDPA path
    torch.testing.assert_close(module(q, k, v, None, packed_seq_params=params)[:sum(LENGTHS)],
                               separate(q, k, v, 1 / math.sqrt(DIM)), rtol=1e-5, atol=1e-6)


def test_unpacked_calls_go_to_the_wrapped_module(monkeypatch):
    local = local_attention()
    module = VarlenCoreAttention(local)
    calls = []
    monkeypatch.setattr(local, "forward", lambda *args, **kwargs: calls.append((args, kwargs)) or "local")
    q, k, v, mask = (torch.zeros(1) for _ in range(4))
    assert module(q, k, v, mask) == "local"
    assert calls == [((q, k, v, mask), {"attn_mask_type": None, "attention_bias": None})]


def test_segments_and_the_wrapping():
    assert Segments.from_cu_seqlens(torch.tensor([0, 2, 5]), 7) == Segments(lengths=(2, 3), tail=2)
    for bad in ([0, 3, 2], [0, 8], [1, 3]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            Segments.from_cu_seqlens(torch.tensor(bad), 7)
    parent = torch.nn.Module()
    parent.core_attention = local_attention()
    assert use_varlen_attention(parent) == 1 and use_varlen_attention(parent) == 0  # idempotent
    assert isinstance(parent.core_attention, VarlenCoreAttention)
    assert parent.state_dict() == {}  # nothing new in a checkpoint


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window": (4, 2)}, r"model.config.window_size=\[4, 2\] is not supported"),
])
def test_what_it_cannot_match_is_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VarlenCoreAttention(local_attention(**kwargs))

