"""Per-token and per-sequence log-probabilities from (vocab-parallel) Megatron logits."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """log p(label_t | prefix) for every position, computed in fp32 across vocab shards.

    Args:
        logits: [b, s, v / tp] this rank's vocabulary shard (any float dtype).
        labels: [b, s] target token ids (global vocabulary ids).
        inplace: megatron's ``vocab_parallel_cross_entropy`` overwrites an fp32 input with the
            softmax (and later its gradient).  Pass True only when the caller never reads
            ``logits`` again; otherwise an fp32 input is cloned first.  Lower-precision input
            is always upcast to a new fp32 tensor, so it is never modified.

    Returns:
        [b, s] fp32 log-probs, differentiable with respect to ``logits``.
    """
    from megatron.core import tensor_parallel

    if logits.dtype == torch.float32 and not inplace:
        logits = logits.clone()
    else:
        logits = logits.float()
    # Position-wise over the last dimension, so [b, s, v] works as well as megatron's [s, b, v].
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.contiguous(), labels)


def sequence_logps(token_logp: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per row, both [b]."""
    mask = loss_mask.to(token_logp.dtype)
    return (token_logp * mask).sum(dim=-1), mask.sum(dim=-1)


def split_groups(per_row: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out as [pos, neg_1..neg_m] per group -> ([B] positives, [B, m] negatives)."""
    grouped = per_row.view(-1, group_size)
    return grouped[:, 0], grouped[:, 1:]


def negative_rows(rows: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices of the negative rows of a [pos, neg_1..neg_m]-per-group layout of ``rows`` rows.

    The reference's log-probs enter the loss only through the negatives (d = s/tau - s_ref of each
    negative), so the frozen reference and the offline scoring pass score these rows alone.
    """
    if rows % group_size:
        raise ValueError(f"{rows} rows are not whole groups of {group_size}")
    index = torch.arange(rows, device=device)
    return index[index % group_size != 0]


ROW_KEYS = ("tokens", "labels", "position_ids", "loss_mask")


def negative_sub_batch(batch: dict[str, torch.Tensor], group_size: int,
                       keys: tuple[str, ...] = ROW_KEYS) -> dict[str, torch.Tensor]:
    """The rows of ``batch`` (padded layout, [R, S] tensors under ``keys``) that hold negatives:
    B * m rows, group g's negatives at rows g*m .. g*m + m - 1."""
    rows = negative_rows(batch["tokens"].shape[0], group_size, batch["tokens"].device)
    sub = {k: batch[k].index_select(0, rows) for k in keys if k in batch}
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape[0] == batch["tokens"].shape[0]:
        sub["attention_mask"] = mask.index_select(0, rows)
    elif mask is not None:
        sub["attention_mask"] = mask  # broadcast over rows
    return sub


def select_negatives(batch: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """The negatives of a padded (:func:`negative_sub_batch`) or packed batch (re-packed:
    :func:`nemo_dft.data.packing.packed_negative_sub_batch`)."""
    if "segment_ids" in batch:
        from nemo_dft.data.packing import packed_negative_sub_batch

        return packed_negative_sub_batch(batch, group_size)
    return negative_sub_batch(batch, group_size)
