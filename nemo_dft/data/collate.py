"""Batching whole groups into Megatron's next-token layout.

A micro-batch of B groups becomes R = B * (1 + m) rows: row ``g * (1 + m)`` is group g's
positive and the next m rows its negatives.  ``group_index`` maps each row to its group, so a
padding-free packed layout can later replace the padded one without touching the loss.
"""

from __future__ import annotations

from typing import Any

import torch


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate_groups(
    items: list[dict[str, Any]], pad_id: int, pad_to: int | None = None, pad_multiple: int = 8,
    negatives_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad a list of dataset groups into one batch.

    Returns ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` of shape [R, S] (inputs are
    sequence[:-1], labels sequence[1:], the mask covers response tokens only), plus
    ``example_index`` [B], ``epoch`` [B], ``group_index`` [R] and ``lengths`` [R] (unpadded
    input lengths), ``ref_neg_logps`` [B, m] when the groups carry offline reference values, and
    ``valid`` [B] (1.0 or 0.0) when they say whether they count (held-out padding does not).
    ``pad_to`` fixes S (pipeline parallel needs one shape for every micro-batch); otherwise S is
    the longest row rounded up to ``pad_multiple``.  ``negatives_only`` (the offline scoring pass,
    whose reference scores only the negatives enter the loss): R = B * m rows, the positives left out.
    """
    sequences: list[list[int]] = []
    prompt_lengths: list[int] = []
    group_index: list[int] = []
    for g, item in enumerate(items):
        for pair in item["pairs"][1:] if negatives_only else item["pairs"]:
            sequences.append(pair.prompt + pair.response)
            prompt_lengths.append(len(pair.prompt))
            group_index.append(g)
    longest = max(len(s) for s in sequences) - 1
    width = pad_to if pad_to is not None else _round_up(max(longest, 1), pad_multiple)
    if longest > width:
        raise ValueError(f"a sequence of {longest + 1} tokens does not fit the padded length {width + 1}")
    rows = len(sequences)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((rows, width), dtype=torch.float32)
    for r, (seq, prompt_len) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        n = len(seq) - 1
        tokens[r, :n] = torch.tensor(seq[:-1])
        labels[r, :n] = torch.tensor(seq[1:])
        # label t predicts token t+1; it is a response token when t+1 >= prompt length
        loss_mask[r, max(prompt_len - 1, 0) : n] = 1.0
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(width, dtype=torch.long).unsqueeze(0).expand(rows, -1).contiguous(),
        "example_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "epoch": torch.tensor([item["epoch"] for item in items], dtype=torch.long),
        "group_index": torch.tensor(group_index, dtype=torch.long),
        "lengths": torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long),
    }
    if "ref_neg_logps" in items[0]:  # offline reference log-probs of each group's negatives
        batch["ref_neg_logps"] = torch.stack([item["ref_neg_logps"] for item in items])
    if "valid" in items[0]:
        batch["valid"] = torch.tensor([float(item["valid"]) for item in items])
    return batch
