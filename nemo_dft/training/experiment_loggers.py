"""TensorBoard and W&B for a training run: both write under ``run.dir`` and receive the scalars
of ``metrics.jsonl`` (``train/<key>``) and of every held-out evaluation (``heldout/<key>``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # W&B makes run.dir/wandb/ itself


def make_loggers(cfg: DictConfig, run_dir: Path) -> dict:
    """Keyword arguments for ``nl.NeMoLogger``: its own TensorBoard and W&B loggers, set up to write
    in ``run_dir`` (never in the current directory)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    tensorboard = None
    if cfg.log.tensorboard:
        tensorboard = TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="",
                                        default_hp_metric=False)
    wandb = None
    if cfg.log.wandb_project:
        wandb = WandbLogger(project=cfg.log.wandb_project, name=cfg.log.wandb_name or run_dir.name,
                            save_dir=str(run_dir), offline=cfg.log.wandb_mode == "offline")
    return {"tensorboard": tensorboard, "wandb": wandb}


class ScalarsToLoggers(pl.Callback):
    """Sends each ``metrics.jsonl`` record and each new held-out evaluation to the trainer's loggers
    (global rank 0), at the optimizer step they belong to."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics  # the MetricsJsonl callback, which runs before this one
        self._evaluations_sent = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._send_evaluations(trainer, pl_module)  # e.g. the one before training
        if trainer.global_rank != 0 or not trainer.loggers or not self.metrics.history:
            return
        record = self.metrics.history[-1]
        scalars = {f"train/{k}": float(v) for k, v in record.items() if k != "step" and v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=int(record["step"]))

    def _send_evaluations(self, trainer: pl.Trainer, pl_module) -> None:
        """Held-out results recorded since the last call (nemo_dft.training.evaluation fills them)."""
        results = getattr(pl_module, "eval_results", [])
        new, self._evaluations_sent = results[self._evaluations_sent:], len(results)
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        for result in new:
            scalars = {f"heldout/{k}": float(v) for k, v in result.items()
                       if k not in ("step", "before_training") and isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=int(result["step"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._send_evaluations(trainer, pl_module)  # the one after the last step
        for logger in trainer.loggers:
            logger.save()

    def teardown(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        """Close the W&B run, so that an offline run is complete (summary written) for ``wandb sync``."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.global_rank == 0 and logger._experiment is not None:
                logger.experiment.finish()
