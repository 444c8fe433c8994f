"""Per-sequence attention over a packed row for megatron's local layer spec (``data.packing``).

Megatron's ``Attention`` already runs packed rows in THD format: given ``packed_seq_params`` it
drops the batch dimension, restarts the rotary embedding at every ``cu_seqlens`` boundary and
hands [t, heads, dim] tensors to its core attention.  Only the local core attention
(``DotProductAttention``) refuses them, which left the local spec with a dense L x L block-diagonal
mask over the whole row: attention cost (sum of lengths)^2 instead of the sum of squared lengths.

:class:`VarlenCoreAttention` wraps a local ``DotProductAttention`` and, for THD calls, computes
causal attention per sequence: the row's positions are gathered into a [sequences, longest, ...]
layout by one index built per micro-batch (:class:`PaddedLayout`), attended with
``scaled_dot_product_attention`` (causal, GQA), and scattered back.  Slots past a sequence's end
repeat its last position; being after every real query they are never attended by one, and their
outputs are dropped.  Positions outside every sequence (the row's tail padding) get zeros.
Calls without ``packed_seq_params`` go to the wrapped module unchanged.

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
class PaddedLayout:
    """Where each position of a packed row goes in a [num_sequences, max_length] layout.

    ``gather`` [num_sequences * max_length]: the row position of each slot (a slot past its
    sequence's end repeats the sequence's last position); ``scatter`` [t]: the slot of each row
    position, or ``num_sequences * max_length`` (an appended zero slot) outside every sequence.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    num_sequences: int
    max_length: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_length: int, total: int) -> PaddedLayout:
        """Built on ``cu_seqlens``' device without a host copy; ``max_length`` must bound every
        sequence (the THD contract of ``max_seqlen``) and ``cu_seqlens[-1] <= total``."""
        cu = cu_seqlens.long()
        num = cu.numel() - 1
        if num < 1 or max_length < 1:
            raise ValueError(f"a packed row needs at least one sequence (cu_seqlens={cu_seqlens.tolist()})")
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        slot = torch.arange(max_length, device=cu.device)
        offset = torch.minimum(slot.unsqueeze(0), (lengths - 1).clamp(min=0).unsqueeze(1))
        gather = (starts.unsqueeze(1) + offset).clamp(max=total - 1).reshape(-1)
        position = torch.arange(total, device=cu.device)
        sequence = torch.searchsorted(cu[1:], position, right=True)  # sequences ending at or before p
        inside = sequence < num
        sequence = sequence.clamp(max=num - 1)
        scatter = torch.where(inside, sequence * max_length + position - starts[sequence], num * max_length)
        return cls(gather=gather, scatter=scatter, num_sequences=num, max_length=max_length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[t, heads, dim] -> [num_sequences, heads, max_length, dim]."""
        padded = x.index_select(0, self.gather).view(self.num_sequences, self.max_length, *x.shape[1:])
        return padded.transpose(1, 2)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[num_sequences, heads, max_length, dim] -> [t, heads * dim] (zeros outside every sequence)."""
        flat = x.transpose(1, 2).reshape(self.num_sequences * self.max_length, -1)
        return torch.cat([flat, flat.new_zeros(1, flat.shape[1])]).index_select(0, self.scatter)


@dataclass
class LocalPackedSeqParams(PackedSeqParams):
    """THD ``PackedSeqParams`` that also carry the micro-batch's :class:`PaddedLayout`, built once
    for all layers (see :func:`nemo_dft.modeling.packed_attention.thd_packed_seq_params`)."""

    layout: PaddedLayout | None = None


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
        layout = getattr(packed_seq_params, "layout", None)
        if layout is None:
            layout = PaddedLayout.from_cu_seqlens(packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q,
                                                  query.shape[0])
        q, k, v = layout.pack(query), layout.pack(key), layout.pack(value)
        dropout = self.local.attention_dropout
        if self.training and dropout.p > 0:
            context = self._explicit(q, k, v)
        else:
            window = self._window_mask(layout.max_length, q.device)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=window, is_causal=window is None,
                                                     scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
        return layout.unpack(context)

    def _window_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """[length, length] bool, True = attend: causal and at most ``window[0]`` back; None
        without a window (plain causal)."""
        window = self.local.scale_mask_softmax.window_size
        if window is None:
            return None
        position = torch.arange(length, device=device)
        back = position.view(-1, 1) - position.view(1, -1)  # i - j
        return (back >= 0) & (back <= window[0])

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention with the probabilities formed, so that the wrapped module's dropout applies
        to them under megatron's RNG tracker, as ``DotProductAttention`` does."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.local.softmax_scale
        coeff = self.local.scale_mask_softmax.scale
        if self.local.scale_mask_softmax.softmax_in_fp32 or coeff is not None:
            scores = scores.float()
        if coeff is not None:
            scores = scores * coeff
        allowed = self._window_mask(q.shape[2], q.device)
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
