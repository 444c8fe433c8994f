"""Held-out ranking evaluation that scores every held-out row exactly once.

Lightning's validation loop drops the last partial global batch (and NeMo skips its sanity check
under pipeline parallelism, and a resumed run has no "before"), so this callback runs the
forward-only pass itself: the held-out groups are padded to whole global batches with copies
marked ``valid = 0``, which the evaluation reduction leaves out of every statistic; each global
batch is split over data-parallel ranks the way Megatron's sampler splits training batches.

It runs before training (once per run: a resumed run keeps the first "before"), every
``trainer.val_check_interval`` steps and after the last step; each result is one line of
``run.dir/eval.jsonl``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from nemo_dft.data.dataset import DFTGroupDataset
from nemo_dft.data.io import write_text_atomic
from nemo_dft.platform.collectives import any_rank, broadcast_from_last_stage
from nemo_dft.training.metrics import without_negatives

logger = logging.getLogger(__name__)

BEFORE, PERIODIC, AFTER = "before", "periodic", "after"


def padded_items(num_rows: int, global_batch_size: int) -> list[tuple[int, bool]]:
    """(held-out row, counts) for every position of the padded pass: each row once, then copies
    of row 0 that are not counted, up to a whole number of global batches."""
    padding = -num_rows % global_batch_size
    return [(i, True) for i in range(num_rows)] + [(0, False)] * padding


def rank_micro_batches(
    items: list[tuple[int, bool]], global_batch_size: int, micro_batch_size: int, dp_size: int, dp_rank: int
) -> list[list[list[tuple[int, bool]]]]:
    """This data-parallel rank's micro-batches of each global batch (Megatron's sampler split:
    consecutive slices of ``micro_batch_size * dp_size`` items, rank r taking the r-th part)."""
    steps = []
    for start in range(0, len(items), global_batch_size):
        batch = items[start : start + global_batch_size]
        chunk = micro_batch_size * dp_size
        steps.append([
            batch[c + dp_rank * micro_batch_size : c + (dp_rank + 1) * micro_batch_size]
            for c in range(0, len(batch), chunk)
        ])
    return steps


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


class HeldOutEvaluation(pl.Callback):
    """Ranking accuracy (and mean log-probs) on the held-out set, appended to ``eval.jsonl``."""

    def __init__(
        self,
        dataset: DFTGroupDataset,
        collate,
        path: Path,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        interval: int | None,
        max_steps: int,
        progress_bar: bool = True,
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.path = Path(path)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.interval = interval
        self.max_steps = max_steps
        self.progress_bar = progress_bar
        self.records: list[dict[str, Any]] = []  # this run's file content, "before" included

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        """Cut results of steps a resume trains again; evaluate the initial weights if this run
        has no "before" yet (a fresh start; a resume keeps the one recorded at its first start)."""
        step = int(trainer.global_step)
        has_before = False
        if trainer.global_rank == 0:
            # a fresh start (step 0, nothing resumed) is a new run: earlier lines are not its own
            kept = [r for r in read_records(self.path) if r["step"] <= step] if step > 0 else []
            if self.path.exists():
                _write_records(self.path, kept)
            self.records = kept
            has_before = any(r["when"] == BEFORE for r in kept)
        if any_rank(has_before):
            return
        if step > 0:
            logger.warning("%s has no evaluation of the initial weights; this resumed run cannot add one", self.path)
            return
        self.evaluate(trainer, pl_module, BEFORE)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step >= self.max_steps:
            self.evaluate(trainer, pl_module, AFTER)
        elif self.interval and step % self.interval == 0:
            self.evaluate(trainer, pl_module, PERIODIC)

    # ---- the pass -----------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module, when: str) -> dict[str, Any]:
        from megatron.core import parallel_state

        from nemo_dft.training.loss_reduction import STAT_NAMES, summarize

        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        items = padded_items(len(self.dataset), self.global_batch_size)
        steps = rank_micro_batches(items, self.global_batch_size, self.micro_batch_size, dp_size, dp_rank)
        pl_module.eval_totals = None
        network = trainer.strategy.model  # NeMo's MegatronParallel
        was_training = network.training
        network.eval()
        bar = tqdm(total=len(steps), desc=f"held-out ({when})", unit="batch",
                   # only on a terminal: in a log file its redraws would bury the one-line result below
                   disable=not self.progress_bar or trainer.global_rank != 0 or not sys.stderr.isatty(),
                   leave=False)
        try:
            with torch.no_grad(), trainer.strategy.precision_plugin.val_step_context():
                for micro_batches in steps:
                    batches = iter([self._batch(mb) for mb in micro_batches])
                    network.validation_step(batches, num_microbatches=len(micro_batches))
                    bar.update(1)
        finally:
            bar.close()
            network.train(was_training)
        totals = pl_module.eval_totals
        if totals is None:
            totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        totals = totals.to(torch.float64).cpu().contiguous()
        broadcast_from_last_stage(totals)
        record: dict[str, Any] = {"step": int(trainer.global_step), "when": when}
        summary = summarize(totals)
        examples = int(totals[STAT_NAMES.index("examples")])
        correct = int(totals[STAT_NAMES.index("rank_correct")])
        record.update({
            "rank_acc": correct / max(examples, 1), "rank_correct": correct, "examples": examples,
            "pos_logps": float(summary["pos_logps"]), "neg_logps": float(summary["neg_logps"]),
            "response_tokens": int(summary["response_tokens"]),
        })
        if without_negatives(pl_module):  # SFT with dft.num_negatives=0: nothing to rank
            record.update(rank_acc=None, rank_correct=None, neg_logps=None)
        pl_module.eval_results.append(record)
        if trainer.global_rank == 0:
            self.records.append(record)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            logger.info("held-out %s (step %d): rank_acc %s over %d prompts", when, record["step"],
                        "n/a" if record["rank_acc"] is None else f"{record['rank_acc']:.4f}", record["examples"])
        return record

    def _batch(self, micro_batch: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
        groups = []
        for index, counts in micro_batch:
            group = dict(self.dataset.group(index))
            group["valid"] = counts
            groups.append(group)
        return self.collate(groups)

    # ---- results ------------------------------------------------------------------------------
    def result(self, when: str) -> dict[str, Any] | None:
        """The newest record of ``when`` (rank 0 reads the file; other ranks hold this run's)."""
        found = [r for r in self.records if r["when"] == when]
        return found[-1] if found else None
