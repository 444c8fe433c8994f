"""Lightning data module feeding whole DFT groups to NeMo's Megatron strategy."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import lightning.pytorch as pl
from nemo.lightning.data import WrappedDataLoader
from nemo.lightning.megatron_parallel import MegatronStep
from nemo.lightning.pytorch.plugins import MegatronDataSampler

from nemo_dft.data.collate import collate_groups
from nemo_dft.data.dataset import DFTGroupDataset
from nemo_dft.data.packing import (
    UNPACKED,
    StepGroups,
    keep_groups,
    pack_groups,
    pack_negatives,
    pack_step,
    without_positives,
)


class DFTDataSampler(MegatronDataSampler):
    """Megatron data sampler whose batch sizes count prompts (groups of 1 + m sequences).

    The pipeline schedule sizes its activation buffers in sequences, so each step is told
    ``micro_batch_size * (1 + m)`` rows of ``seq_len`` tokens.

    With ``pack_length`` (packed rows of a fixed length, the layout pipeline parallelism needs) the
    loader hands over unpacked groups (:class:`~nemo_dft.data.packing.StepGroups`); each step then
    takes all of this rank's micro-batches, packs their groups into rows of ``pack_length``
    positions (:func:`~nemo_dft.data.packing.pack_step`) and runs one micro-batch per row: a step
    still trains ``global_batch_size`` prompts, in as many micro-batches as its groups need rows.
    Every pipeline stage of a data-parallel rank reads the same groups, so all plan the same rows.
    """

    def __init__(self, *, group_size: int, pad_id: int = 0, pack_length: int | None = None,
                 negatives_only: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group_size = group_size
        self.pad_id = pad_id
        self.pack_length = pack_length
        self.negatives_only = negatives_only

    def on_megatron_step_start(self, step: MegatronStep) -> MegatronStep:
        items = step.num_microbatches  # the evaluation loop says how many micro-batches it hands over
        step = super().on_megatron_step_start(step)
        if self.pack_length is None:
            return dataclasses.replace(step, micro_batch_size=self.micro_batch_size * self.group_size)
        groups = []
        for _ in range(items or step.num_microbatches):
            item = next(step.data)
            item = item[0] if isinstance(item, tuple) else item  # (batch, batch_idx, dataloader_idx)
            if not isinstance(item, dict) or not isinstance(item.get(UNPACKED), StepGroups):
                raise TypeError(f"data.pack_length: expected unpacked groups from the loader, got {type(item)}")
            groups.extend(item[UNPACKED].groups)
        rows = pack_step(without_positives(groups) if self.negatives_only else groups, self.pad_id, self.pack_length)
        return dataclasses.replace(step, data=iter(rows), num_microbatches=len(rows), micro_batch_size=1,
                                   seq_length=self.pack_length)


class DFTDataModule(pl.LightningDataModule):
    """Training groups and, optionally, held-out groups for ranking accuracy."""

    def __init__(
        self,
        train: DFTGroupDataset,
        validation: DFTGroupDataset | None,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        pad_id: int,
        fixed_length: bool,
        num_workers: int = 0,
        negatives_only: bool = False,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        super().__init__()
        self.train_dataset = train
        self.validation_dataset = validation
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        width = train.settings.max_length - 1
        self.seq_length = width
        if pack_length is not None and not packing:
            raise ValueError("pack_length needs packing")
        if packing and pack_length is not None:  # rows of pack_length, packed per step by the sampler
            self.collate = keep_groups
            self.seq_length = pack_length
        elif packing:  # one row of whole groups end to end (nemo_dft.data.packing)
            if fixed_length:
                raise ValueError("packed micro-batches of varying length cannot run under pipeline parallelism: "
                                 "set pack_length")
            self.collate = functools.partial(pack_negatives if negatives_only else pack_groups, pad_id=pad_id)
        else:
            self.collate = functools.partial(collate_groups, pad_id=pad_id, pad_to=width if fixed_length else None,
                                             negatives_only=negatives_only)
        self.num_workers = num_workers
        self.init_global_step = 0
        self.data_sampler = DFTDataSampler(
            group_size=train.settings.num_negatives + (0 if negatives_only else 1),
            pad_id=pad_id,
            pack_length=pack_length,
            negatives_only=negatives_only,
            seq_len=self.seq_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            dataloader_type="single",
        )

    def setup(self, stage: str = "") -> None:
        self.init_global_step = self.trainer.global_step if self.trainer is not None else 0
        self.data_sampler.init_global_step = self.init_global_step

    def _loader(self, dataset: DFTGroupDataset, mode: str) -> WrappedDataLoader:
        return WrappedDataLoader(
            mode=mode,
            dataset=dataset,
            num_workers=self.num_workers,
            pin_memory=False,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> WrappedDataLoader:
        return self._loader(self.train_dataset, "train")

    def val_dataloader(self) -> WrappedDataLoader | list:
        return self._loader(self.validation_dataset, "validation") if self.validation_dataset is not None else []

    def state_dict(self) -> dict[str, Any]:
        """Data position saved with every checkpoint: samples consumed so far."""
        consumed = self.data_sampler.compute_consumed_samples(self.trainer.global_step - self.init_global_step)
        return {"consumed_samples": consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = state_dict["consumed_samples"]
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1
