"""Build everything a DFT run needs from a validated config and train it with NeMo."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.training import ConfigError, data_parallel_size
from nemo_dft.data.dataset import DFTGroupDataset, group_settings
from nemo_dft.data.io import read_rows
from nemo_dft.modeling.runtime import enable_device, make_strategy, slurm_plugins
from nemo_dft.modeling.tokenizer import load_tokenizer
from nemo_dft.platform.console import adopt_library_logging
from nemo_dft.platform.precision import precision_plugin

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    run_dir: Path
    seconds: float
    history: list[dict] = field(default_factory=list)
    preempted: bool = False  # stopped by a signal after saving a checkpoint; rerun to resume


def build_datasets(cfg: DictConfig, tokenizer) -> tuple[DFTGroupDataset, DFTGroupDataset | None]:
    """The training groups, and the held-out groups (one pass, negatives 0..m-1, fixed order)."""
    settings = group_settings(cfg)
    train = DFTGroupDataset(read_rows(cfg.data.path), tokenizer, settings, source=str(cfg.data.path))
    if not cfg.data.eval_path:
        return train, None
    eval_settings = dataclasses.replace(settings, num_epochs=1, per_epoch_negatives=False, shuffle=False)
    held_out = DFTGroupDataset(read_rows(cfg.data.eval_path), tokenizer, eval_settings, str(cfg.data.eval_path))
    return train, held_out


def attach_offline_reference(cfg: DictConfig, train: DFTGroupDataset, hf_tokenizer) -> None:
    """Read ``dft.ref_logps`` after checking it was computed for exactly this data, tokenizer,
    template, truncation, negatives and checkpoint; every group then carries its values."""
    from nemo_dft.reference import fingerprint
    from nemo_dft.reference.table import load_reference_table

    try:
        table = load_reference_table(cfg.dft.ref_logps, train, fingerprint.for_run(cfg, hf_tokenizer))
    except ValueError as err:
        raise ConfigError(f"dft.ref_logps: {err}") from err
    train.attach_reference(table)


def resolve_max_steps(cfg: DictConfig, train: DFTGroupDataset) -> int:
    """Steps that the configured epochs of data allow; a larger request is an error."""
    available = len(train) // cfg.model.global_batch_size
    if available < 1:
        raise ConfigError(
            f"model.global_batch_size: {cfg.model.global_batch_size} prompts exceed the "
            f"{len(train)} prompts of data.num_epochs={cfg.data.num_epochs} epochs"
        )
    if cfg.trainer.max_steps is None:
        return available
    if cfg.trainer.max_steps > available:
        raise ConfigError(
            f"trainer.max_steps: {cfg.trainer.max_steps} steps need "
            f"{cfg.trainer.max_steps * cfg.model.global_batch_size} prompts, but data.num_epochs="
            f"{cfg.data.num_epochs} over {train.num_examples} examples gives {len(train)}; raise "
            "data.num_epochs (each epoch needs its own dft.num_negatives negative columns)"
        )
    return cfg.trainer.max_steps


def train(cfg: DictConfig) -> TrainResult:
    """Run (or resume) DFT training as configured; returns a summary for rank 0 to print."""
    started = time.perf_counter()
    on_gpu = enable_device(cfg)
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    from nemo_dft.modeling.gpt_config import make_gpt_config  # imports NeMo: after the device set-up
    from nemo_dft.platform.signals import parse_signals
    from nemo_dft.training import throughput
    from nemo_dft.training.experiment_loggers import ScalarsToLoggers, make_loggers
    from nemo_dft.training.loss_reduction import DFTHyperParameters
    from nemo_dft.training.memory_report import OptimizerMemoryReport
    from nemo_dft.training.metrics import MetricsJsonl
    from nemo_dft.training.model import DFTModel
    from nemo_dft.training.preemption import PreemptionStop
    from nemo_dft.training.reference_pipeline import PipelinedReference

    adopt_library_logging()
    run_dir = Path(cfg.run.dir).resolve()
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds = build_datasets(cfg, tokenizer.tokenizer)
    if not cfg.dft.ref_free and cfg.dft.reference == "offline":
        attach_offline_reference(cfg, train_ds, tokenizer.tokenizer)
    max_steps = resolve_max_steps(cfg, train_ds)
    gbs = cfg.model.global_batch_size
    dp = data_parallel_size(cfg)
    eval_batches = 0
    if eval_ds is not None:
        eval_batches = len(eval_ds) // gbs
        if eval_batches == 0:
            raise ConfigError(
                f"data.eval_path: {len(eval_ds)} held-out prompts are fewer than one global batch ({gbs})"
            )

    gpt_config = make_gpt_config(cfg, on_gpu)
    optim = MegatronOptimizerModule(
        config=OptimizerConfig(
            optimizer="adam",
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.adam_beta1,
            adam_beta2=cfg.optim.adam_beta2,
            adam_eps=cfg.optim.adam_eps,
            clip_grad=cfg.optim.clip_grad,
            bf16=cfg.model.precision == "bf16",
            fp16=cfg.model.precision == "fp16",
            params_dtype=gpt_config.params_dtype,
            use_distributed_optimizer=cfg.model.use_distributed_optimizer,
        ),
        lr_scheduler=CosineAnnealingScheduler(
            max_steps=max_steps,
            warmup_steps=int(cfg.optim.warmup_ratio * max_steps),
            constant_steps=0,
            min_lr=cfg.optim.min_lr,
        ),
    )
    model = DFTModel(
        gpt_config,
        dft=DFTHyperParameters(
            tau=cfg.dft.tau, gamma=cfg.dft.gamma, num_negatives=cfg.dft.num_negatives, ref_free=cfg.dft.ref_free,
            reference=cfg.dft.reference,
        ),
        num_train_examples=train_ds.num_examples,
        u_init=cfg.dft.u_init,
        reference_dir=str(run_dir / "reference"),
        optim=optim,
        tokenizer=tokenizer,
    )
    from nemo_dft.data.datamodule import DFTDataModule

    data = DFTDataModule(
        train_ds,
        eval_ds,
        micro_batch_size=cfg.model.micro_batch_size,
        global_batch_size=gbs,
        pad_id=tokenizer.tokenizer.pad_token_id or 0,
        fixed_length=cfg.model.pipeline_model_parallel_size > 1,
    )
    from nemo_dft.platform.memory import ddp_config
    from nemo_dft.training.strategy import DFTMegatronStrategy

    strategy = make_strategy(cfg, gpt_config, on_gpu, DFTMegatronStrategy, ddp=ddp_config(cfg.model))
    metrics = MetricsJsonl(run_dir / "metrics.jsonl", progress_bar=cfg.trainer.progress_bar,
                           throughput=throughput.for_run(cfg, gpt_config, tokenizer.vocab_size, on_gpu))
    preemption = PreemptionStop(parse_signals(list(cfg.trainer.preemption_signals)))
    val_interval = cfg.trainer.val_check_interval or max_steps
    trainer = nl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        max_steps=max_steps,
        strategy=strategy,
        plugins=[precision_plugin(cfg.model), *slurm_plugins()],
        callbacks=[metrics, ScalarsToLoggers(metrics), preemption, PipelinedReference(),
                   OptimizerMemoryReport(run_dir / "memory.json")],
        logger=False,  # NeMoLogger sets the run's own loggers (in run.dir, not ./lightning_logs)
        default_root_dir=str(run_dir),
        log_every_n_steps=1,
        limit_val_batches=eval_batches,
        num_sanity_val_steps=eval_batches,
        val_check_interval=min(val_interval, max_steps),
        # NeMo's progress printer deadlocks gloo runs with pipeline parallelism (a collective on rank 0
        # only); MetricsJsonl draws the progress bar instead.
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    checkpoint = nl.ModelCheckpoint(
        monitor="step",
        mode="max",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=cfg.checkpoint.every_n_steps or max_steps,
        save_on_train_epoch_end=False,
        save_optim_on_train_end=True,  # the final checkpoint must be resumable too
        filename="{step}",
        dirpath=str(run_dir / "checkpoints"),
    )
    # NeMo moves every file at the top of its log directory into run_N/ when a run restarts, so
    # its logs live in logs/ and metrics.jsonl and config.yaml stay put at the top of run.dir.
    nemo_logger = nl.NeMoLogger(
        explicit_log_dir=str(run_dir / "logs"), ckpt=checkpoint, **make_loggers(cfg, run_dir),
        update_logger_directory=False,
    )
    resume = nl.AutoResume(
        resume_if_exists=True,
        resume_from_directory=str(run_dir / "checkpoints"),
        resume_ignore_no_checkpoint=True,
        restore_config=nl.RestoreConfig(path=cfg.model.init_from) if cfg.model.init_from else None,
    )
    if trainer.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
    logger.info("DFT: %d steps, data-parallel size %d", max_steps, dp)
    llm.train(model, data, trainer, log=nemo_logger, resume=resume)

    # The "before" evaluation is Lightning's sanity check, which NeMo skips with pipeline parallelism.
    before = [r for r in model.eval_results if r["before_training"]]
    after = [r for r in model.eval_results if not r["before_training"]]
    history = metrics.history
    return TrainResult(
        steps=int(trainer.global_step),
        final_loss=history[-1]["loss"] if history else None,
        eval_before=before[0] if before else None,
        eval_after=after[-1] if after else None,
        run_dir=run_dir,
        seconds=time.perf_counter() - started,
        history=history,
        preempted=preemption.preempted,
    )
