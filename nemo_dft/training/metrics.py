"""Training callbacks: one JSON line of metrics per optimizer step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from tqdm import tqdm

from nemo_dft.data.io import write_text_atomic
from nemo_dft.platform.collectives import broadcast_from_last_stage
from nemo_dft.training.throughput import Throughput

METRIC_KEYS = ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc")
COUNT_KEYS = ("tokens", "padded_tokens", "padded_token_pairs")  # for throughput, not written themselves


def metrics_from_last_stage(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """The last pipeline stage computes the loss; send its numbers to the stage's other ranks."""
    vector = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
    broadcast_from_last_stage(vector)
    return dict(zip(keys, vector.tolist(), strict=True))


def progress_fields(record: dict) -> dict[str, str]:
    """The progress bar's numbers: loss, ranking accuracy, tokens/s, TFLOP/s per device and MFU."""
    fields = {"loss": f"{record['loss']:.3f}"}
    if record.get("rank_acc") is not None:  # null without negatives (SFT with dft.num_negatives=0)
        fields["rank_acc"] = f"{record['rank_acc']:.2f}"
    fields["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if record.get("tflops_per_device") is not None:
        fields["TFLOP/s"] = f"{record['tflops_per_device']:.3g}"
    if record.get("mfu") is not None:
        fields["MFU"] = f"{100 * record['mfu']:.1f}%"
    return fields


def without_negatives(pl_module) -> bool:
    """True when the run scores no negatives (SFT with dft.num_negatives=0)."""
    dft = getattr(pl_module, "dft", None)
    return dft is not None and dft.num_negatives == 0


class MetricsJsonl(pl.Callback):
    """Appends ``{"step", "loss", "lr", "grad_norm", ..., "tokens_per_s", "tflops_per_device", "mfu"}``
    per step to a file (throughput: nemo_dft/training/throughput.py).

    Every rank takes part in the pipeline broadcast; global rank 0 writes.  The file is opened
    in append mode so a resumed run continues it.
    """

    def __init__(self, path: Path, progress_bar: bool = True, throughput: Throughput | None = None) -> None:
        self.path = Path(path)
        self.throughput = throughput
        self.progress_bar = progress_bar
        self._bar: tqdm | None = None
        self._last_time: float | None = None
        self.history: list[dict[str, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        """On resume, drop lines of steps after the checkpoint: they are about to be trained again."""
        if trainer.global_rank != 0 or trainer.global_step == 0 or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= trainer.global_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._last_time is None:
            self._last_time = time.perf_counter()
        if self.progress_bar and self._bar is None and trainer.global_rank == 0:
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="DFT", unit="step")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        elapsed = max(now - (self._last_time or now), 1e-9)
        self._last_time = now
        values = metrics_from_last_stage(pl_module.last_train_metrics, METRIC_KEYS + COUNT_KEYS)
        grad_norm = trainer.callback_metrics.get("grad_norm")
        record = {
            "step": int(trainer.global_step),
            **{k: values[k] for k in METRIC_KEYS},
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": values["tokens"] / elapsed,
            "step_s": elapsed,
        }
        if self.throughput is not None:
            record.update(self.throughput.measure(values["tokens"], values["padded_tokens"],
                                                  values["padded_token_pairs"], elapsed))
        if torch.cuda.is_available():  # this rank's peak since the start (GPU runs; scripts/gpu_kit.sh reads it)
            record["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if getattr(pl_module, "nonfinite_guard", None) is not None:
            record["skipped_steps"] = pl_module.nonfinite_guard.skipped  # trainer.nonfinite=skip
        if without_negatives(pl_module):  # nothing to rank: null, not a misleading 0
            record["rank_acc"] = record["neg_logps"] = None
        self.history.append(record)
        if record["rank_acc"] is not None:
            pl_module.log("rank_acc", values["rank_acc"], prog_bar=True, batch_size=1, rank_zero_only=True)
        if self._bar is not None:
            self._bar.set_postfix(progress_fields(record), refresh=False)
            self._bar.update(1)
        if trainer.global_rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
