"""Per-sequence attention over a packed row for megatron's local layer spec (``data.packing``).

Megatron's ``Attention`` already runs packed rows in THD format: given ``packed_seq_params`` it
drops the batch dimension, restarts the rotary embedding at every ``cu_seqlens`` boundary and
hands [t, heads, dim] tensors to its core attention.  Only the local core attention
(``DotProductAttention``) refuses them, which left the local spec with a dense L x L block-diagonal
mask over the whole row: attention cost (sum of lengths)^2 instead of the sum of squared lengths.

:class:`VarlenCoreAttention` wraps a local ``DotProductAttention`` and, for THD calls, computes
causal attention on each sequence of the row: its q, k, v are views of the row (split at the
boundaries), attended with ``scaled_dot_product_attention`` (causal, GQA), and the outputs are
concatenated back.  Attention then costs the sum of the squared sequence lengths, what the
sequences cost alone.  A padded [sequences, longest] layout (one SDPA call) pays the longest
sequence's square for every one: on this CPU, for rows of 6 to 9 sequences of the lognormal
lengths of nemo_dft.data.lengths, it matched the split at 1/8 of those lengths and was 1.2 to
2.6x slower at 1/2.  The lengths are read once per micro-batch (:class:`Segments`,
the only host copy), not per layer.  Positions outside every sequence (the row's tail padding)
get zeros.  Calls without ``packed_seq_params`` go to the wrapped module unchanged.

Kept from the wrapped module: the softmax scale (``softmax_scale`` or 1/sqrt(kv_channels), with
``apply_query_key_layer_scaling`` folded back in, as its softmax does), the layer's sliding window
(keys at most ``window[0]`` positions back, as megatron's local softmax builds it) and attention
dropout (with dropout in training the probabilities are formed explicitly, so the wrapped module's
dropout applies under megatron's RNG tracker, as in ``DotProductAttention``).  Refused, naming the
config key: a non-vanilla ``softmax_type`` and a window that looks ahead (``window[1] != 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule


@dataclass(frozen=True)
class Segments:
    """The sequences of a packed row: their lengths, then ``tail`` positions outside every
    sequence (the row's padding), as Python ints so that splitting the row needs no host copy."""

    lengths: tuple[int, ...]
    tail: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int) -> Segments:
        """From THD boundaries (one host copy) and the row's ``total`` positions."""
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] > total:
            raise ValueError(f"cu_seqlens {bounds} do not describe a packed row of {total} positions")
        lengths = tuple(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True))
        if min(lengths) < 0:
            raise ValueError(f"cu_seqlens {bounds} decrease")
        return cls(lengths=lengths, tail=total - bounds[-1])


@dataclass
class LocalPackedSeqParams(PackedSeqParams):
    """THD ``PackedSeqParams`` that also carry the micro-batch's :class:`Segments`, read once for
    all layers (see :func:`nemo_dft.modeling.packed_attention.thd_packed_seq_params`)."""

    segments: Segments | None = None


class VarlenCoreAttention(MegatronModule):
    """A local ``DotProductAttention`` that also takes THD ``packed_seq_params`` (module docstring)."""

    def __init__(self, local: DotProductAttention) -> None:
        super().__init__(config=local.config)
        if local.config.softmax_type != "vanilla":
            raise ValueError(f"data.packing=true on the local layer spec: model.config.softmax_type="
                             f"{local.config.softmax_type!r} is not supported (only 'vanilla')")
        window = local.scale_mask_softmax.window_size
        if window is not None and (window[0] < 0 or window[1] != 0):
            raise ValueError(f"data.packing=true on the local layer spec: model.config.window_size={list(window)} "
                             "is not supported (a causal window [left >= 0, 0] is)")
        self.local = local

    @property
    def scale(self) -> float:
        """The scale on q.k: megatron divides it by the layer number under query-key layer
        scaling and multiplies the scores back in its softmax."""
        return self.local.softmax_scale * (self.local.scale_mask_softmax.scale or 1.0)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        if packed_seq_params is None:
            return self.local(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd" or attention_bias is not None:
            raise ValueError("VarlenCoreAttention takes THD packed_seq_params without an attention bias")
        segments = getattr(packed_seq_params, "segments", None)
        if segments is None:
            segments = Segments.from_cu_seqlens(packed_seq_params.cu_seqlens_q, query.shape[0])
        sizes = [*segments.lengths, segments.tail]
        explicit = self.training and self.local.attention_dropout.p > 0
        window = self._window_mask(max(segments.lengths), query.device)
        outputs = []
        for index, (q, k, v) in enumerate(zip(query.split(sizes), key.split(sizes), value.split(sizes), strict=True)):
            n = q.shape[0]
            if index == len(segments.lengths) or n == 0:
                continue  # the tail, or an empty sequence
            # [1, heads, n, dim]: torch's CPU flash kernel takes 4-D input only (3-D falls back to the
            # math kernel, measured 1.7x slower fwd + bwd at n = 90)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            allowed = None if window is None else window[:n, :n]
            if explicit:
                context = self._explicit(q, k, v, allowed)
            else:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                                         scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
            outputs.append(context[0].transpose(0, 1).reshape(n, -1))
        if segments.tail:
            outputs.append(query.new_zeros(segments.tail, query.shape[1] * query.shape[2]))
        return torch.cat(outputs)

    def _window_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """[length, length] bool, True = attend: causal and at most ``window[0]`` back; None
        without a window (plain causal)."""
        window = self.local.scale_mask_softmax.window_size
        if window is None:
            return None
        position = torch.arange(length, device=device)
        back = position.view(-1, 1) - position.view(1, -1)  # i - j
        return (back >= 0) & (back <= window[0])

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  allowed: torch.Tensor | None) -> torch.Tensor:
        """One sequence's attention ([1, heads, n, dim]) with the probabilities formed, so that the
        wrapped module's dropout applies to them under megatron's RNG tracker, as in
        ``DotProductAttention``."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.local.softmax_scale
        coeff = self.local.scale_mask_softmax.scale
        if self.local.scale_mask_softmax.softmax_in_fp32 or coeff is not None:
            scores = scores.float()
        if coeff is not None:
            scores = scores * coeff
        if allowed is None:
            allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(q.dtype)
        if self.config.sequence_parallel:
            probs = self.local.attention_dropout(probs)
        else:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.local.attention_dropout(probs)
        return torch.matmul(probs, v)


def use_varlen_attention(module: torch.nn.Module) -> int:
    """Wrap every local ``DotProductAttention`` under ``module`` in :class:`VarlenCoreAttention`
    (idempotent; the modules hold no weights, so checkpoints are unchanged).  Returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        if isinstance(parent, VarlenCoreAttention):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is DotProductAttention:
                setattr(parent, name, VarlenCoreAttention(child))
                replaced += 1
    return replaced
