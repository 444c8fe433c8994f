"""The 1-to-m training set as a map-style dataset of whole groups, unrolled over epochs.

Item ``j`` is example ``order_e[j mod N]`` of epoch ``e = j // N``: one positive and the m
negatives that epoch uses (``e*m .. e*m+m-1`` with per-epoch negatives, else ``0..m-1``).  The
unrolled view makes the epoch, the shuffle and the negative block pure functions of the number
of consumed samples, which is what Megatron's samplers count and checkpoint.

Truncation is decided once per row, over the positive and every negative column the run uses (all
epochs' blocks), as the paper's trainer does; every epoch then reads the same cut sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from nemo_dft.data.rows import ID_COLUMN, POSITIVE_COLUMN, negative_column, normalize_rows, validate_dft_rows
from nemo_dft.data.tokenize import ChatTokenizer, TokenizedPair, render, tokenize_pair, truncate_group

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSettings:
    """How rows become groups of token sequences."""

    num_negatives: int  # m; 0 (SFT only): groups of the positive alone
    max_length: int
    max_prompt_length: int
    num_epochs: int = 1
    per_epoch_negatives: bool = True
    shuffle: bool = True
    seed: int = 1234
    add_bos: bool = True
    append_eos: bool = True  # the paper trainer's EOS after every response not ending in one
    allow_empty_answers: bool = False  # data.empty_answers=keep: train on empty answers (the paper keeps them)

    def __post_init__(self) -> None:
        if self.num_negatives < 0:
            raise ValueError(f"dft.num_negatives must be >= 0, got {self.num_negatives}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be > 0 and below "
                f"data.max_length ({self.max_length})"
            )
        if self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be >= 1, got {self.num_epochs}")

    @property
    def distinct_epochs(self) -> int:
        """Epochs whose groups differ: all of them with per-epoch negatives, else only the first."""
        return self.num_epochs if self.per_epoch_negatives else 1

    def negative_block(self, epoch: int) -> int:
        """Which of the ``distinct_epochs`` negative blocks ``epoch`` uses."""
        return epoch if self.per_epoch_negatives else 0

    @property
    def negatives_needed(self) -> int:
        return self.num_negatives * self.distinct_epochs

    def negative_columns(self, epoch: int) -> list[int]:
        first = self.negative_block(epoch) * self.num_negatives
        return list(range(first, first + self.num_negatives))


class DFTGroupDataset(torch.utils.data.Dataset):
    """Validated, tokenized groups; ``len`` is examples x epochs."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer: ChatTokenizer,
        settings: GroupSettings,
        source: str,
    ) -> None:
        rows = normalize_rows(rows, source)
        validate_dft_rows(rows, source, settings.negatives_needed, settings.allow_empty_answers)
        self.settings = settings
        self.source = source
        self.reference_logps: torch.Tensor | None = None
        self.example_ids: list[Any] = [row.get(ID_COLUMN, i) for i, row in enumerate(rows)]
        columns = [POSITIVE_COLUMN] + [negative_column(k) for k in range(settings.negatives_needed)]
        self._pairs: list[dict[str, TokenizedPair]] = []
        self._row_truncated: list[bool] = []
        for index, row in enumerate(tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 5000)):
            encoded: list[TokenizedPair] = []
            for column in columns:
                try:
                    prompt, response = render(tokenizer, row[column])
                except Exception as err:  # the template's own error, with the row named
                    raise ValueError(
                        f"{source}: row {index} (id={self.example_ids[index]!r}), column '{column}': "
                        f"chat template failed: {err}"
                    ) from err
                encoded.append(tokenize_pair(tokenizer, prompt, response, settings.add_bos, settings.append_eos))
            row_group = truncate_group(encoded, settings.max_length, settings.max_prompt_length)
            self._pairs.append(dict(zip(columns, row_group.pairs, strict=True)))
            self._row_truncated.append(row_group.truncated)
        generator = torch.Generator().manual_seed(settings.seed)
        self._orders = [
            torch.randperm(len(rows), generator=generator).tolist() if settings.shuffle else list(range(len(rows)))
            for _ in range(settings.num_epochs)
        ]
        truncated_rows = sum(self._row_truncated)
        if truncated_rows:
            logger.warning(
                "%s: %d of %d rows exceed data.max_length=%d with their longest response over the positive "
                "and all %d negative columns, and were truncated in every epoch (prompt kept to its last "
                "data.max_prompt_length=%d tokens, then responses cut)",
                source, truncated_rows, len(rows), settings.max_length, settings.negatives_needed,
                settings.max_prompt_length,
            )
        self.num_truncated = truncated_rows * settings.num_epochs  # groups over all epochs

    def attach_reference(self, table: torch.Tensor) -> None:
        """Offline reference log-probs, [examples, epochs with distinct negatives, m]; each group
        then carries its negatives' values as ``ref_neg_logps``."""
        if tuple(table.shape) != (self.num_examples, self.settings.distinct_epochs, self.settings.num_negatives):
            raise ValueError(f"reference table of shape {tuple(table.shape)} does not fit {self.source}")
        self.reference_logps = table

    @property
    def num_examples(self) -> int:
        return len(self._pairs)

    def __len__(self) -> int:
        return self.num_examples * self.settings.num_epochs

    def locate(self, item: int) -> tuple[int, int]:
        """(epoch, example index) of unrolled item ``item``."""
        epoch, position = divmod(item, self.num_examples)
        return epoch, self._orders[epoch][position]

    def group(self, item: int) -> dict[str, Any]:
        epoch, index = self.locate(item)
        columns = [POSITIVE_COLUMN] + [negative_column(k) for k in self.settings.negative_columns(epoch)]
        pairs = [self._pairs[index][c] for c in columns]
        group = {"index": index, "epoch": epoch, "pairs": pairs, "truncated": self._row_truncated[index]}
        if self.reference_logps is not None:
            group["ref_neg_logps"] = self.reference_logps[index, self.settings.negative_block(epoch)]
        return group

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.group(item)


def group_settings(cfg: Any) -> GroupSettings:
    """How the training rows become groups (negatives, truncation, epochs, order), from a training config."""
    return GroupSettings(
        num_negatives=cfg.dft.num_negatives,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        num_epochs=cfg.data.num_epochs,
        per_epoch_negatives=cfg.dft.per_epoch_negatives,
        shuffle=cfg.data.shuffle,
        seed=cfg.run.seed,
        add_bos=cfg.data.add_bos,
        append_eos=cfg.data.append_eos,
        allow_empty_answers=cfg.data.empty_answers == "keep",
    )
