"""Build everything a DFT run needs from a validated config and train it with NeMo."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.training import ConfigError, data_parallel_size, uses_pack_length
from nemo_dft.data.dataset import DFTGroupDataset, group_settings
from nemo_dft.data.io import read_rows, write_text_atomic
from nemo_dft.modeling.runtime import enable_device, make_strategy, slurm_plugins
from nemo_dft.modeling.tokenizer import load_tokenizer
from nemo_dft.platform.console import adopt_library_logging, process_rank
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


def read_checked_rows(cfg: DictConfig) -> dict[str, list[dict]]:
    """Rows of ``data.path`` and ``data.eval_path``, read and validated before anything heavy; a bad
    file, row or column is a ConfigError naming them.  ``data.empty_answers=drop`` leaves out rows
    with an empty answer, counted in the log."""
    from nemo_dft.data.rows import drop_empty_answers, normalize_rows, validate_dft_rows

    settings = group_settings(cfg)
    needed = {"data.path": settings.negatives_needed, "data.eval_path": settings.num_negatives}
    checked = {}
    for key, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if not path:
            continue
        try:
            rows = normalize_rows(read_rows(path), str(path))  # ShareGPT rows in role/content form
            if cfg.data.empty_answers == "drop":
                rows, dropped = drop_empty_answers(rows, needed[key])
                if dropped:
                    shown = dropped[:10] + (["..."] if len(dropped) > 10 else [])
                    logger.warning("%s: left out %d rows with an empty answer (data.empty_answers=drop): ids %s",
                                   path, len(dropped), shown)
            validate_dft_rows(rows, str(path), needed[key], settings.allow_empty_answers)
        except ValueError as err:  # DataFormatError, RowError
            raise ConfigError(f"{key}: {err}") from err
        checked[key] = rows
    return checked


def build_datasets(
    cfg: DictConfig, tokenizer, rows: dict[str, list[dict]]
) -> tuple[DFTGroupDataset, DFTGroupDataset | None]:
    """The training groups, and the held-out groups (one pass, negatives 0..m-1, fixed order)."""
    settings = group_settings(cfg)
    try:
        train = DFTGroupDataset(rows["data.path"], tokenizer, settings, source=str(cfg.data.path))
        if not cfg.data.eval_path:
            return train, None
        eval_settings = dataclasses.replace(settings, num_epochs=1, per_epoch_negatives=False, shuffle=False)
        held_out = DFTGroupDataset(rows["data.eval_path"], tokenizer, eval_settings, str(cfg.data.eval_path))
    except ValueError as err:  # a row the chat template cannot render, named by row and column
        raise ConfigError(f"data: {err}") from err
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


def check_adapter_checkpoints(cfg: DictConfig, resume_from: Path | None) -> dict[str, str] | None:
    """The base record of ``peft.checkpoint=adapters`` (None when checkpoints hold every weight),
    after checking that ``model.init_from`` has base weights and, on a resume from an adapter-only
    checkpoint, that it still holds the base that checkpoint was saved against."""
    from nemo_dft.modeling.adapter_checkpoint import adapter_record, check_recorded_base, refuse_adapter_only_init_from

    refuse_adapter_only_init_from(cfg.model.init_from)
    if resume_from is not None:
        check_recorded_base(resume_from, cfg.model.init_from)
    from nemo_dft.config.training import checkpoint_contents

    if checkpoint_contents(cfg) != "adapters":
        return None
    return adapter_record(cfg.model.init_from)


def train(cfg: DictConfig, rows: dict[str, list[dict]] | None = None) -> TrainResult:
    """Run (or resume) DFT training as configured; returns a summary for rank 0 to print.

    ``rows``: the output of :func:`read_checked_rows`, when the caller checked the data already."""
    started = time.perf_counter()
    if rows is None:
        rows = read_checked_rows(cfg)  # data errors before any device or NeMo set-up
    run_dir = Path(cfg.run.dir).resolve()
    from nemo_dft.training.recovery import choose_resume_checkpoint

    resume_from = choose_resume_checkpoint(run_dir, first_rank=process_rank() == 0)
    if resume_from is not None and (run_dir / "config.yaml").exists():
        from nemo_dft.config.rerun import check_rerun

        for change in check_rerun(run_dir / "config.yaml", cfg):
            logger.info("resumed with a changed setting: %s", change)
    adapter_base = check_adapter_checkpoints(cfg, resume_from)  # before NeMo: a changed base exits 2
    if resume_from is None and cfg.model.init_from and process_rank() == 0:
        from nemo_dft.modeling.lora import checkpoint_has_adapters

        if checkpoint_has_adapters(cfg.model.init_from):
            logger.warning("model.init_from %s holds LoRA adapters; only its base weights are loaded%s",
                           cfg.model.init_from, " and new adapters start from them" if cfg.peft.scheme else "")
    on_gpu = enable_device(cfg)
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    from nemo_dft.modeling.gpt_config import make_gpt_config  # imports NeMo: after the device set-up
    from nemo_dft.modeling.lora import lora_settings
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
    gpt_config = make_gpt_config(cfg, on_gpu)  # first: a checkpoint's shape may not fit the layout
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds = build_datasets(cfg, tokenizer.tokenizer, rows)
    if not cfg.dft.ref_free and cfg.dft.reference == "offline":
        attach_offline_reference(cfg, train_ds, tokenizer.tokenizer)
    max_steps = resolve_max_steps(cfg, train_ds)
    gbs = cfg.model.global_batch_size
    dp = data_parallel_size(cfg)

    # SFT's loss is a token mean over the global batch: megatron then divides the gradients by the
    # token count summed over micro-batches and data-parallel ranks (set either way: a checkpoint's
    # own config, model.preset=checkpoint, may carry the other objective's value)
    # Rows of data.pack_length hold a varying number of prompts, so DFT's mean over prompts is
    # taken the same way: each micro-batch returns its summed loss and its prompt count.
    gpt_config.calculate_per_token_loss = cfg.dft.objective == "sft" or uses_pack_length(cfg)
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
            reference=cfg.dft.reference, objective=cfg.dft.objective,
        ),
        num_train_examples=train_ds.num_examples,
        u_init=cfg.dft.u_init,
        reference_dir=str(run_dir / "reference"),
        optim=optim,
        tokenizer=tokenizer,
        lora=lora_settings(cfg),
    )
    from nemo_dft.data.datamodule import DFTDataModule

    data = DFTDataModule(
        train_ds,
        None,  # the held-out pass is HeldOutEvaluation's, not Lightning's validation loop
        micro_batch_size=cfg.model.micro_batch_size,
        global_batch_size=gbs,
        pad_id=tokenizer.tokenizer.pad_token_id or 0,
        fixed_length=cfg.model.pipeline_model_parallel_size > 1,
        packing=cfg.data.packing,
        pack_length=cfg.data.pack_length,
    )
    from nemo_dft.platform.memory import ddp_config
    from nemo_dft.training.strategy import DFTMegatronStrategy

    strategy = make_strategy(cfg, gpt_config, on_gpu, DFTMegatronStrategy, ddp=ddp_config(cfg.model))
    from nemo_dft.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(cfg.trainer.nonfinite, train_ds.example_ids, check_gradients=cfg.model.precision != "fp16")
    strategy.nonfinite_guard = model.nonfinite_guard = guard
    strategy.adapter_base = adapter_base
    metrics = MetricsJsonl(run_dir / "metrics.jsonl", progress_bar=cfg.trainer.progress_bar,
                           throughput=throughput.for_run(cfg, gpt_config, tokenizer.vocab_size, on_gpu))
    preemption = PreemptionStop(parse_signals(list(cfg.trainer.preemption_signals)))
    callbacks = [metrics, ScalarsToLoggers(metrics), preemption, PipelinedReference(),
                 OptimizerMemoryReport(run_dir / "memory.json")]
    evaluation = None
    if eval_ds is not None:
        from nemo_dft.training.evaluation import HeldOutEvaluation

        evaluation = HeldOutEvaluation(
            eval_ds, data.collate, run_dir / "eval.jsonl", global_batch_size=gbs,
            micro_batch_size=cfg.model.micro_batch_size, interval=cfg.trainer.val_check_interval,
            max_steps=max_steps, progress_bar=cfg.trainer.progress_bar,
        )
        callbacks.append(evaluation)
    trainer = nl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        max_steps=max_steps,
        strategy=strategy,
        plugins=[precision_plugin(cfg.model), *slurm_plugins()],
        callbacks=callbacks,
        logger=False,  # NeMoLogger sets the run's own loggers (in run.dir, not ./lightning_logs)
        default_root_dir=str(run_dir),
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        # NeMo's progress printer deadlocks gloo runs with pipeline parallelism (a collective on rank 0
        # only); MetricsJsonl draws the progress bar instead.
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    from nemo_dft.training.checkpoint_names import StepCheckpoint

    checkpoint = StepCheckpoint(
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
        resume_from_path=str(resume_from) if resume_from else None,  # checked above, not NeMo's pick
        resume_if_exists=True,
        resume_from_directory=str(run_dir / "checkpoints"),
        resume_ignore_no_checkpoint=True,
        restore_config=nl.RestoreConfig(path=cfg.model.init_from) if cfg.model.init_from else None,
    )
    if trainer.global_rank == 0:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    logger.info("DFT: %d steps, data-parallel size %d", max_steps, dp)
    llm.train(model, data, trainer, log=nemo_logger, resume=resume)

    history = metrics.history
    from nemo_dft.training.evaluation import AFTER, BEFORE

    return TrainResult(
        steps=int(trainer.global_step),
        final_loss=history[-1]["loss"] if history else None,
        eval_before=evaluation.result(BEFORE) if evaluation else None,
        eval_after=evaluation.result(AFTER) if evaluation else None,
        run_dir=run_dir,
        seconds=time.perf_counter() - started,
        history=history,
        preempted=preemption.preempted,
    )
