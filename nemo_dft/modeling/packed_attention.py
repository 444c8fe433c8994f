"""Attention over packed rows (``data.packing``): each sequence attends only to its own earlier tokens.

Two paths, one layout (:mod:`nemo_dft.data.packing`):

- the local layer spec (CPU, any run without Transformer Engine): a block-diagonal causal mask,
  [rows, 1, L, L] booleans, True where attention is masked (megatron's convention), built from the
  row's segment ids; a sliding window (Mistral's ``window_size``) is built into the same mask.
  Megatron's local softmax *replaces* any given mask by its own sliding-window causal mask when
  the config has ``window_size`` (measured: error 0.29 on a packed row), so a packed run must not
  leave the window to it: :func:`resolve_window` drops a window that can never bind (no row longer
  than it) and refuses one that would, naming the keys;
- Transformer Engine (GPU): megatron-core's ``PackedSeqParams`` in THD format with the row's
  ``cu_seqlens``, as NeMo 2's packed fine-tuning passes them (:func:`thd_packed_seq_params`).
  UNTESTED here: this machine has neither a GPU nor Transformer Engine.

Positions: ``position_ids`` restart at 0 for every sequence (the packer's), which is what a learned
absolute embedding reads.  Megatron-core's rotary embedding ignores ``position_ids`` and rotates by
the index in the row: on the local spec a packed sequence therefore relies on RoPE's relative form
(q_i . k_j depends on i - j only, and the mask keeps j in the same sequence), measured equal to the
separate sequences to 5e-7 in logits; TE's THD path restarts the rotation at each boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def block_causal_mask(segment_ids: torch.Tensor, window: Sequence[int] | None = None) -> torch.Tensor:
    """[rows, 1, L, L] bool, True = masked: query i may attend key j when both are in the same
    sequence (segment id >= 0) and j <= i (and i - j <= window[0] with a sliding window).  Padding
    positions attend to themselves only, so no row of the softmax is empty."""
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


def window_binds(window: Sequence[int] | int | None, row_length: int) -> bool:
    """True when a sliding window excludes some earlier token of a row of ``row_length`` positions."""
    if window is None:
        return False
    left = window if isinstance(window, int) else window[0]
    return left >= 0 and row_length - 1 > left


def resolve_window(config, row_length: int, *, transformer_engine: bool) -> None:
    """Make a packed run's sliding window explicit (see the module docstring).

    With Transformer Engine the window is applied per sequence by its THD kernels and stays.  On
    the local spec a window no row can exceed is removed from ``config`` (logged); a shorter one is
    refused, because the local softmax would silently discard the packed mask.
    """
    window = getattr(config, "window_size", None)
    if window is None or transformer_engine:
        return
    if window_binds(window, row_length):
        raise ValueError(
            f"data.packing=true: model.config.window_size={list(window)} is shorter than a packed row of "
            f"{row_length} positions, and the local attention (no Transformer Engine) would replace the packed "
            "mask by its own sliding-window mask; set data.packing=false, or a window of at least the row length"
        )
    logger.info("data.packing: the sliding window %s never binds on rows of %d positions; the block-diagonal "
                "mask is used without it", list(window), row_length)
    config.window_size = None


def thd_packed_seq_params(cu_seqlens: torch.Tensor, width: int):
    """megatron-core ``PackedSeqParams`` (THD) for one packed row of ``width`` positions.

    The row's tail padding becomes one more sequence, so the boundaries cover every position:
    a varlen kernel leaves positions past the last boundary unwritten, and an uninitialised value
    there would reach the per-sequence sums as NaN * 0.  UNTESTED with Transformer Engine (no GPU
    here); mirrors what NeMo 2's packed SFT passes to the model.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    if int(cu_seqlens[-1]) < width:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([width])])
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def packed_forward_kwargs(batch: dict[str, torch.Tensor], transformer_engine: bool) -> dict:
    """The model's attention arguments for a packed batch: THD ``packed_seq_params`` with
    Transformer Engine, else the block-diagonal causal mask (local spec)."""
    if transformer_engine:
        return {"attention_mask": None,
                "packed_seq_params": thd_packed_seq_params(batch["cu_seqlens"], batch["tokens"].shape[-1])}
    return {"attention_mask": block_causal_mask(batch["segment_ids"])}


def uses_transformer_engine(module: torch.nn.Module) -> bool:
    """True when the model's layers are Transformer Engine modules (the TE layer spec)."""
    return any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in module.modules())
