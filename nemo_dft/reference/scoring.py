"""The offline scoring pass: reference log-probs of every group a training run will use.

A forward-only pass (NeMo validation, so any TP/PP/DP layout works) over the training groups of
every epoch, built exactly as training builds them (template, tokenization, group-wise
truncation), with the initial weights of ``model.init_from``.  Only the negatives are scored: the
loss reads the reference's log-prob of each negative (d = s/tau - s_ref) and nothing reads the
positives', so their rows are left out of the pass.  Every micro-batch is padded to
``data.max_length``, so a sequence's score does not depend on which batch it lands in, and a
resumed pass reproduces the uninterrupted one bit for bit.  With ``data.packing`` the negatives are
packed as training packs groups (one row per micro-batch, or rows of ``data.pack_length`` under
pipeline parallelism), which computes only real positions; a score then depends on the row it
shares only through fp32 rounding (about 1e-7 relative), so a resumed packed pass agrees with an
uninterrupted one to that rounding rather than bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from nemo.lightning.megatron_parallel import MegatronLossReduction
from omegaconf import DictConfig
from tqdm import tqdm

from nemo_dft.data.dataset import DFTGroupDataset
from nemo_dft.data.packing import is_packed, packed_sequence_logps
from nemo_dft.data.rows import negative_column
from nemo_dft.modeling.logprob_model import LogProbGPTModel
from nemo_dft.modeling.logprobs import sequence_logps
from nemo_dft.platform.collectives import any_rank
from nemo_dft.platform.console import adopt_library_logging
from nemo_dft.platform.signals import SignalLatch
from nemo_dft.reference import store
from nemo_dft.reference.table import expected_groups

logger = logging.getLogger(__name__)


class ScoringInterrupted(Exception):
    """A signal asked the pass to stop; the shards written so far are kept for the rerun."""


@dataclass
class ScoringResult:
    output: Path
    scored_groups: int  # in this run
    resumed_groups: int  # from earlier, interrupted runs
    rows: int  # in the final file


class _PendingGroups(torch.utils.data.Dataset):
    """The groups still to score, padded (by repeating the last) to whole global batches."""

    def __init__(self, groups: DFTGroupDataset, items: list[int], multiple: int) -> None:
        self.groups = groups
        self.settings = groups.settings
        self.items = items + [items[-1]] * (-len(items) % multiple)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.groups.group(self.items[position])


class _ScoringReduction(MegatronLossReduction):
    """Per-sequence summed log-probs of a micro-batch, gathered over data-parallel ranks."""

    def __init__(self, model: ScoringModel) -> None:
        super().__init__()
        self._model = [model]

    def forward(self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor):
        if is_packed(batch):  # data.packing: the negatives end to end (one row, or rows of data.pack_length)
            sums, lengths = packed_sequence_logps(forward_out, batch["loss_mask"], batch["segment_ids"],
                                                  batch["lengths"].numel())
        else:
            sums, lengths = sequence_logps(forward_out, batch["loss_mask"])
        zero = (sums.sum() * 0.0).detach()
        return zero, torch.tensor(1, device=sums.device), {
            "logp": sums.detach(), "tokens": lengths.detach(),
            "example_index": batch["example_index"], "epoch": batch["epoch"],
        }

    def reduce(self, outputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        from megatron.core import parallel_state

        merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            for key, value in merged.items():
                parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, value.contiguous(), group=group)
                merged[key] = torch.cat(parts)
        self._model[0].scored.append({k: v.cpu() for k, v in merged.items()})
        return torch.tensor(0.0)


class ScoringModel(LogProbGPTModel):
    """The policy network in forward-only use; its validation reduction collects scores."""

    scored: list[dict[str, torch.Tensor]]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scored = []

    @property
    def validation_loss_reduction(self):
        if not self._validation_loss_reduction:
            self._validation_loss_reduction = _ScoringReduction(self)
        return self._validation_loss_reduction

    def on_validation_epoch_end(self) -> None:
        return None


class _ShardWriterCallback(Callback):
    """Writes scored groups as shards (on one rank of the last stage) and stops on a signal."""

    def __init__(self, output: Path, stamp: dict[str, str], groups_per_shard: int, groups: DFTGroupDataset,
                 total: int, signals: list[signal.Signals]) -> None:
        self.output, self.stamp, self.groups_per_shard = output, stamp, groups_per_shard
        self.groups = groups
        self.total = total
        self.writer: store.ShardWriter | None = None
        self.bar: tqdm | None = None
        self.written: set[store.GroupKey] = set()
        self.latch = SignalLatch(signals)

    def on_validation_start(self, trainer, pl_module) -> None:
        trainer.validate_loop.verbose = False  # no results table: the pass's loss is a placeholder 0
        if _is_writer():  # the parallel state exists from here on
            self.writer = store.ShardWriter(self.output, self.stamp, self.groups_per_shard)
            self.bar = tqdm(total=self.total, desc="scoring groups", unit="group")
        self.latch.install()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for scored in pl_module.scored:
            self._write(scored)
        pl_module.scored.clear()
        if any_rank(self.latch.received):
            if self.writer is not None:
                self.writer.flush()
            raise ScoringInterrupted()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.writer is not None:
            self.writer.flush()
        self.close_bar()
        self.latch.restore()

    def _write(self, scored: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        group_size = self.groups.settings.num_negatives  # negatives only
        for g, (index, epoch) in enumerate(zip(scored["example_index"].tolist(), scored["epoch"].tolist(),
                                               strict=True)):
            key = (store.encode_id(self.groups.example_ids[index]), epoch)
            if key in self.written:
                continue  # a repeat that pads the last global batch
            self.written.add(key)
            columns = [negative_column(k) for k in self.groups.settings.negative_columns(epoch)]
            rows = scored["logp"][g * group_size:(g + 1) * group_size].tolist()
            tokens = scored["tokens"][g * group_size:(g + 1) * group_size].tolist()
            self.writer.add_group([
                {"id": key[0], "epoch": epoch, "column": c, "logp": v, "tokens": int(t)}
                for c, v, t in zip(columns, rows, tokens, strict=True)
            ])
            if self.bar is not None:
                self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_writer() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def scoring_groups(cfg: DictConfig, hf_tokenizer) -> DFTGroupDataset:
    """The training groups of every epoch with distinct negatives, in file order (no shuffle)."""
    from nemo_dft.data.dataset import group_settings
    from nemo_dft.data.io import read_rows

    training = group_settings(cfg)
    # without per-epoch negatives every epoch has the same groups: they are scored once
    settings = dataclasses.replace(training, num_epochs=training.distinct_epochs, shuffle=False)
    return DFTGroupDataset(read_rows(cfg.data.path), hf_tokenizer, settings, source=str(cfg.data.path))


def score(cfg: DictConfig, output: str | Path, groups_per_shard: int, signals: list[signal.Signals]) -> ScoringResult:
    """Run (or resume) the scoring pass and write ``output``; see the module docstring."""
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_dft.config.training import data_parallel_size
    from nemo_dft.data.datamodule import DFTDataModule
    from nemo_dft.modeling.gpt_config import make_gpt_config
    from nemo_dft.modeling.runtime import enable_device, make_strategy, slurm_plugins
    from nemo_dft.modeling.tokenizer import load_tokenizer
    from nemo_dft.platform.precision import precision_plugin
    from nemo_dft.reference import fingerprint

    adopt_library_logging()
    output = Path(output).resolve()
    on_gpu = enable_device(cfg)
    tokenizer = load_tokenizer(cfg)
    groups = scoring_groups(cfg, tokenizer.tokenizer)
    stamp = fingerprint.for_run(cfg, tokenizer.tokenizer)
    done = store.completed_groups(output, stamp)
    pending = [item for item in range(len(groups)) if _group_key(groups, item) not in done]
    micro = cfg.model.micro_batch_size
    global_batch = micro * data_parallel_size(cfg)
    logger.info("scoring %d groups (%d already scored) into %s", len(pending), len(done), output)

    if pending:
        data = _PendingGroups(groups, pending, global_batch)
        gpt_config = make_gpt_config(cfg, on_gpu)
        model = ScoringModel(gpt_config, tokenizer=tokenizer)
        module = DFTDataModule(data, data, micro_batch_size=micro, global_batch_size=global_batch,
                               pad_id=tokenizer.tokenizer.pad_token_id or 0, negatives_only=True,
                               # padded: always to max_length (scores independent of the batch)
                               fixed_length=not cfg.data.packing or cfg.model.pipeline_model_parallel_size > 1,
                               packing=cfg.data.packing, pack_length=cfg.data.pack_length)
        strategy = make_strategy(cfg, gpt_config, on_gpu)
        trainer = nl.Trainer(
            accelerator="gpu" if on_gpu else "cpu", devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            strategy=strategy, plugins=[precision_plugin(cfg.model), *slurm_plugins()],
            limit_val_batches=len(data) // global_batch, num_sanity_val_steps=0, enable_progress_bar=False,
            use_distributed_sampler=False, logger=False,
        )
        writer_callback = _ShardWriterCallback(output, stamp, groups_per_shard, groups, len(pending), signals)
        trainer.callbacks.append(writer_callback)
        log = nl.NeMoLogger(explicit_log_dir=str(store.partial_dir(output) / "logs"), tensorboard=None, wandb=None,
                            ckpt=None, update_logger_directory=False)
        resume = nl.AutoResume(restore_config=nl.RestoreConfig(path=cfg.model.init_from))
        try:
            llm.validate(model, module, trainer, log=log, resume=resume)
        finally:
            writer_callback.close_bar()
        _barrier()
    rows = 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        description = {"num_examples": groups.num_examples, "epochs": groups.settings.distinct_epochs,
                       "num_negatives": cfg.dft.num_negatives}
        rows = store.merge(output, stamp, expected_groups(groups), description)
    _barrier()
    return ScoringResult(output=output, scored_groups=len(pending), resumed_groups=len(done), rows=rows)


def _group_key(groups: DFTGroupDataset, item: int) -> store.GroupKey:
    epoch, index = groups.locate(item)
    return store.encode_id(groups.example_ids[index]), epoch


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
