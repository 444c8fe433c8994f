"""Packing whole groups end to end: the padding-free layout of a micro-batch (``data.packing``).

A group (its positive and m negatives) is never split: all its sequences go, in the padded
layout's order, into one packed row.  Two layouts:

- one pipeline stage: a micro-batch of B groups is one row holding all B (1 + m) sequences end
  to end, its width the total length rounded up to ``pad_multiple`` (the only padding);
- pipeline parallelism needs one activation shape for every micro-batch: rows of exactly
  ``pack_length`` positions, each holding as many whole groups as fit (:func:`plan_rows`,
  first fit over the groups in decreasing length), so a step's micro-batches carry a varying
  number of prompts while the global batch still counts prompts.

``position_ids`` restart at 0 for every sequence (what a learned absolute position embedding
reads).  The model runs a packed row in megatron-core's THD format with the row's ``cu_seqlens``
(:mod:`nemo_dft.modeling.packed_attention`): rotary embeddings restart at every boundary and
attention stays within each sequence (Transformer Engine's kernels, or on the local spec
:mod:`nemo_dft.modeling.varlen_attention`), as in the padded layout.  Per-sequence log-probs are recovered with
:func:`packed_sequence_logps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PADDING_SEGMENT = -1  # segment id of padding positions


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_rows(group_lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Assign groups (by total input length) to rows of ``pack_length`` positions, whole groups
    only: first fit in decreasing length.  Returns each row's group indices in ascending order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for g in sorted(range(len(group_lengths)), key=lambda i: (-group_lengths[i], i)):
        need = group_lengths[g]
        if need > pack_length:
            raise ValueError(f"a group of {need} positions does not fit data.pack_length={pack_length}")
        for r, space in enumerate(free):
            if need <= space:
                rows[r].append(g)
                free[r] -= need
                break
        else:
            rows.append([g])
            free.append(pack_length - need)
    return [sorted(row) for row in rows]


def _group_positions(item: dict[str, Any]) -> int:
    return sum(len(pair.prompt) + len(pair.response) - 1 for pair in item["pairs"])


def without_positives(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups with their negatives only (the offline scoring pass: nothing reads a positive's
    reference score); packed, group g's negatives are then sequences g*m .. g*m + m - 1."""
    return [{**item, "pairs": item["pairs"][1:]} for item in items]


def pack_negatives(items: list[dict[str, Any]], pad_id: int, pad_multiple: int = 8) -> dict[str, torch.Tensor]:
    """:func:`pack_groups` of the groups' negatives alone (see :func:`without_positives`)."""
    return pack_groups(without_positives(items), pad_id, pad_multiple=pad_multiple)


def pack_step(items: list[dict[str, Any]], pad_id: int, pack_length: int) -> list[dict[str, torch.Tensor]]:
    """A data-parallel rank's groups of one optimizer step as rows of exactly ``pack_length``
    positions (pipeline parallelism's layout): each row is one micro-batch of whole groups
    (:func:`plan_rows`), so the step has as many micro-batches as rows.

    Groups are planned per run of consecutive groups of one epoch, runs in order: within a run
    every example is distinct, so reordering it changes no u update; an example that recurs in
    the next epoch (a step crossing an epoch boundary) still comes after its earlier occurrence.
    Each row also carries ``last_row`` (a bool tensor), true on the step's last row.
    """
    rows: list[dict[str, torch.Tensor]] = []
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and items[end]["epoch"] == items[start]["epoch"]:
            end += 1
        run = items[start:end]
        for row in plan_rows([_group_positions(item) for item in run], pack_length):
            rows.append(pack_groups([run[g] for g in row], pad_id, width=pack_length))
        start = end
    for r, row in enumerate(rows):  # the u table's exchanges of a step crossing epochs key on the last row
        row["last_row"] = torch.tensor(r == len(rows) - 1)
    return rows


class StepGroups:
    """A micro-batch's groups left unpacked by the data loader (``data.pack_length``): the data
    sampler packs a whole step's groups into rows (:func:`pack_step`) once it holds them all.
    A plain holder, so that collection utilities pass it through untouched."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups


UNPACKED = "unpacked_groups"


def keep_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The collate function of ``data.pack_length``: the groups, unpacked (see :class:`StepGroups`),
    beside their ``example_index`` (Lightning reads a batch's size from its first tensor)."""
    return {UNPACKED: StepGroups(list(items)),
            "example_index": torch.tensor([item["index"] for item in items], dtype=torch.long)}


def pack_groups(items: list[dict[str, Any]], pad_id: int, width: int | None = None,
                pad_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Lay the groups of ``items`` end to end in one row (shape [1, width]).

    Returns ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (restarting at 0 for each
    sequence) and ``segment_ids`` (the sequence's row number in the padded layout, -1 on padding),
    all [1, width]; ``cu_seqlens`` [R + 1] (sequence boundaries, int32, for THD attention);
    ``example_index``, ``epoch``, ``group_index``, ``lengths`` and, when present, ``ref_neg_logps``
    and ``valid`` as :func:`nemo_dft.data.collate.collate_groups` has them.  ``width`` fixes the row
    length (pipeline parallelism); otherwise it is the total rounded up to ``pad_multiple``.
    """
    sequences: list[list[int]] = []
    prompt_lengths: list[int] = []
    group_index: list[int] = []
    for g, item in enumerate(items):
        for pair in item["pairs"]:
            sequences.append(pair.prompt + pair.response)
            prompt_lengths.append(len(pair.prompt))
            group_index.append(g)
    total = sum(len(s) - 1 for s in sequences)
    width = _round_up(max(total, 1), pad_multiple) if width is None else width
    if total > width:
        raise ValueError(f"{len(items)} groups of {total} positions do not fit a packed row of {width}")
    tokens = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, width), dtype=torch.float32)
    position_ids = torch.zeros((1, width), dtype=torch.long)
    segment_ids = torch.full((1, width), PADDING_SEGMENT, dtype=torch.long)
    cu_seqlens = [0]
    start = 0
    for r, (seq, prompt_len) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        n = len(seq) - 1
        tokens[0, start:start + n] = torch.tensor(seq[:-1])
        labels[0, start:start + n] = torch.tensor(seq[1:])
        loss_mask[0, start + max(prompt_len - 1, 0):start + n] = 1.0
        position_ids[0, start:start + n] = torch.arange(n)
        segment_ids[0, start:start + n] = r
        start += n
        cu_seqlens.append(start)
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        "example_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "epoch": torch.tensor([item["epoch"] for item in items], dtype=torch.long),
        "group_index": torch.tensor(group_index, dtype=torch.long),
        "lengths": torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long),
    }
    if "ref_neg_logps" in items[0]:
        batch["ref_neg_logps"] = torch.stack([item["ref_neg_logps"] for item in items])
    if "valid" in items[0]:
        batch["valid"] = torch.tensor([float(item["valid"]) for item in items])
    return batch


def packed_sequence_logps(token_logp: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                          num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs, response tokens) per sequence, [R] each, from a packed layout;
    the same numbers :func:`nemo_dft.modeling.logprobs.sequence_logps` gives on the padded one."""
    mask = loss_mask.to(token_logp.dtype) * (segment_ids >= 0)
    segment = segment_ids.clamp(min=0).reshape(-1)
    sums = token_logp.new_zeros(num_sequences).index_add(0, segment, (token_logp * mask).reshape(-1))
    counts = mask.new_zeros(num_sequences).index_add(0, segment, mask.reshape(-1))
    return sums, counts


def real_fraction(groups: Sequence[Sequence[int]], chunk: int, *, packing: bool, pack_length: int | None = None,
                  padded_width: int | None = None, pad_multiple: int = 8) -> float:
    """Share of the positions a step computes that are real tokens, for groups given as their
    sequences' input lengths, taken ``chunk`` consecutive groups at a time (the counting behind the
    README's numbers and tests/data/test_packing.py).

    padded (``packing=False``): a chunk is a micro-batch, every row padded to its longest
    (rounded up to ``pad_multiple``) or to ``padded_width`` (pipeline parallelism: max_length - 1);
    packed without ``pack_length``: a chunk is a micro-batch, one row; packed with ``pack_length``
    (pipeline parallelism): a chunk is what a data-parallel rank trains in a step, planned into
    rows of ``pack_length`` by :func:`plan_rows`."""
    real = computed = 0
    for start in range(0, len(groups), chunk):
        part = groups[start:start + chunk]
        lengths = [n for group in part for n in group]
        real += sum(lengths)
        if not packing:
            width = padded_width if padded_width is not None else _round_up(max(lengths), pad_multiple)
            computed += width * len(lengths)
        elif pack_length is None:
            computed += _round_up(sum(lengths), pad_multiple)
        else:
            computed += pack_length * len(plan_rows([sum(group) for group in part], pack_length))
    return real / computed


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    return "segment_ids" in batch


def packed_negative_sub_batch(batch: dict[str, torch.Tensor], group_size: int,
                              pad_multiple: int = 8, width: int | None = None) -> dict[str, torch.Tensor]:
    """The negatives of a packed row, packed again on their own (the reference scores only them):
    ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``segment_ids`` (0 .. B * m - 1, group
    g's negatives at g*m .. g*m + m - 1) and ``cu_seqlens``.  ``width`` fixes the row length (the
    pipelined reference needs one shape for all of a step's micro-batches; see
    :func:`step_negative_width`); otherwise it is the total rounded up to ``pad_multiple``."""
    segments = batch["segment_ids"][0]
    keep = (segments >= 0) & (segments % group_size != 0)
    total = int(keep.sum())
    width = _round_up(max(total, 1), pad_multiple) if width is None else width
    if total > width:
        raise ValueError(f"{total} negative positions do not fit a packed row of {width}")
    sub: dict[str, torch.Tensor] = {}
    for key, fill in (("tokens", 0), ("labels", 0), ("loss_mask", 0), ("position_ids", 0)):
        row = batch[key].new_full((1, width), fill)
        row[0, :total] = batch[key][0, keep]
        sub[key] = row
    kept = segments[keep]
    renumbered = kept - kept // group_size - 1  # drop the positive's slot in every group
    sub["segment_ids"] = segments.new_full((1, width), PADDING_SEGMENT)
    sub["segment_ids"][0, :total] = renumbered
    lengths = torch.bincount(renumbered, minlength=int(batch["lengths"].numel() // group_size * (group_size - 1)))
    sub["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return sub


def step_negative_width(batches: Sequence[dict[str, torch.Tensor]], group_size: int, pad_multiple: int = 8) -> int:
    """One row width for the negatives of all of a step's packed rows (the pipelined reference
    needs one shape): the most negative positions of any row, rounded up to ``pad_multiple``."""
    def positions(batch: dict[str, torch.Tensor]) -> int:
        segments = batch["segment_ids"][0]
        return int(((segments >= 0) & (segments % group_size != 0)).sum())

    return _round_up(max(max(positions(batch) for batch in batches), 1), pad_multiple)
