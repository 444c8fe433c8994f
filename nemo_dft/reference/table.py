"""Reference log-probs for training: the file's values laid out by (example, epoch, negative)."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_dft.data.dataset import DFTGroupDataset
from nemo_dft.data.rows import negative_column
from nemo_dft.reference.store import GroupKey, check_fingerprint, encode_id, read_file


def expected_groups(dataset: DFTGroupDataset) -> list[tuple[GroupKey, list[str]]]:
    """Every group the training run will use, in file order, with the columns scored for it: its
    negatives (the positives' reference log-probs are never used, so they are not scored)."""
    groups = []
    for epoch in range(dataset.settings.distinct_epochs):
        columns = [negative_column(k) for k in dataset.settings.negative_columns(epoch)]
        groups.extend(((encode_id(example_id), epoch), columns) for example_id in dataset.example_ids)
    return groups


def load_reference_table(path: str | Path, dataset: DFTGroupDataset, fingerprint: dict[str, str]) -> torch.Tensor:
    """[examples, scored epochs, m] fp32 reference log-probs of the negatives.

    Raises ValueError naming the file when its fingerprint differs from this run's or when any
    (id, epoch, column) the run needs is absent.
    """
    rows, metadata = read_file(path)
    check_fingerprint(path, metadata, fingerprint)
    values = {(row["id"], row["epoch"], row["column"]): row["logp"] for row in rows}
    settings = dataset.settings
    table = torch.empty(dataset.num_examples, settings.distinct_epochs, settings.num_negatives, dtype=torch.float32)
    missing: list[tuple[str, int, str]] = []
    for index, example_id in enumerate(dataset.example_ids):
        key = encode_id(example_id)
        for epoch in range(table.shape[1]):
            for k, column in enumerate(negative_column(c) for c in settings.negative_columns(epoch)):
                value = values.get((key, epoch, column))
                if value is None:
                    missing.append((key, epoch, column))
                else:
                    table[index, epoch, k] = value
    if missing:
        shown = ", ".join(f"id={k} epoch={e} column={c}" for k, e, c in missing[:3])
        raise ValueError(f"{path}: {len(missing)} reference log-probs this run needs are missing ({shown}"
                         f"{', ...' if len(missing) > 3 else ''}); recompute the file for this dataset")
    return table
