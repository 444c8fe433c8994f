"""Attention over packed rows (``data.packing``): each sequence attends only to its own earlier tokens.

One path for both layer specs: megatron-core's ``PackedSeqParams`` in THD format with the row's
``cu_seqlens`` (:func:`thd_packed_seq_params`), as NeMo 2's packed fine-tuning passes them.
Megatron's ``Attention`` then applies the rotary embedding per sequence (positions restart at
every boundary, as in the padded layout) and hands [t, heads, dim] tensors to its core attention:

- Transformer Engine (GPU): its THD kernels attend per sequence, a sliding window included.
  UNTESTED here: this machine has neither a GPU nor Transformer Engine;
- the local layer spec (CPU, any run without Transformer Engine): megatron's local core attention
  refuses THD input, so the first packed forward wraps it in
  :class:`~nemo_dft.modeling.varlen_attention.VarlenCoreAttention` (causal SDPA on each
  sequence, the layer's sliding window kept), and the params carry the sequence lengths, read
  once for all layers.  Attention then costs the sum of the sequences' squared lengths, where the
  block-diagonal mask this path used before cost the row length squared (issue 26).

``position_ids`` restart at 0 for every sequence (the packer's), which is what a learned absolute
embedding reads.  :func:`block_causal_mask` is no longer on the trainer's path; it stays for
``benchmarks/step_cost.py``, whose HF re-implementation of the layouts takes a dense mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_causal_mask(segment_ids: torch.Tensor, window: Sequence[int] | None = None) -> torch.Tensor:
    """[rows, 1, L, L] bool, True = masked: query i may attend key j when both are in the same
    sequence (segment id >= 0) and j <= i (and i - j <= window[0] with a sliding window).  Padding
    positions attend to themselves only, so no row of the softmax is empty.  Dense (L x L): for the
    HF re-implementation in benchmarks/step_cost.py, not the trainer (see the module docstring)."""
    length = segment_ids.shape[-1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    same &= (segment_ids >= 0).unsqueeze(-1)
    position = torch.arange(length, device=segment_ids.device)
    offset = position.view(-1, 1) - position.view(1, -1)  # i - j
    allowed = same & (offset >= 0)
    if window is not None:
        allowed &= offset <= window[0]
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return (~allowed).unsqueeze(1)


def thd_packed_seq_params(cu_seqlens: torch.Tensor, width: int, *, local: bool = False):
    """megatron-core ``PackedSeqParams`` (THD) for one packed row of ``width`` positions.

    The row's tail padding becomes one more sequence, so the boundaries cover every position:
    a varlen kernel leaves positions past the last boundary unwritten, and an uninitialised value
    there would reach the per-sequence sums as NaN * 0 (and megatron's per-sequence rotary
    embedding splits the row at the boundaries).  ``local``: the params also carry the real
    sequences' :class:`~nemo_dft.modeling.varlen_attention.Segments` for the local spec's core
    attention, which gives the tail zeros instead of attending over it.  One host copy of
    ``cu_seqlens`` per micro-batch (megatron takes the maxima as Python ints).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_dft.modeling.varlen_attention import LocalPackedSeqParams, Segments

    segments = Segments.from_cu_seqlens(cu_seqlens, width)
    covering = cu_seqlens.to(torch.int32)
    if segments.tail:
        covering = torch.cat([covering, covering.new_tensor([width])])
    max_seqlen = max(*segments.lengths, segments.tail)
    common = {"qkv_format": "thd", "cu_seqlens_q": covering, "cu_seqlens_kv": covering,
              "max_seqlen_q": max_seqlen, "max_seqlen_kv": max_seqlen}
    return LocalPackedSeqParams(**common, segments=segments) if local else PackedSeqParams(**common)


def packed_forward_kwargs(batch: dict[str, torch.Tensor], transformer_engine: bool) -> dict:
    """The model's attention arguments for a packed batch (one row, [1, width]): THD
    ``packed_seq_params``, with the sequence lengths for the local spec (no Transformer Engine)."""
    tokens = batch["tokens"]
    if tokens.shape[0] != 1:  # megatron's THD path squeezes a batch dimension of 1
        raise ValueError(f"a packed micro-batch is one row; got {tokens.shape[0]} rows")
    return {"attention_mask": None,
            "packed_seq_params": thd_packed_seq_params(batch["cu_seqlens"], tokens.shape[-1],
                                                       local=not transformer_engine)}


def prepare_packed(module: torch.nn.Module) -> bool:
    """Ready ``module`` for packed batches, once; True when its layers are Transformer Engine's.
    On the local spec its core attentions are wrapped for THD input (``use_varlen_attention``)."""
    transformer_engine = getattr(module, "_nemo_dft_te", None)
    if transformer_engine is None:
        transformer_engine = uses_transformer_engine(module)
        if not transformer_engine:
            from nemo_dft.modeling.varlen_attention import use_varlen_attention

            use_varlen_attention(module)
        module._nemo_dft_te = transformer_engine
    return transformer_engine


def uses_transformer_engine(module: torch.nn.Module) -> bool:
    """True when the model's layers are Transformer Engine modules (the TE layer spec)."""
    return any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in module.modules())
