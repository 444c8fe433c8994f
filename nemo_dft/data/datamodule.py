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
from nemo_dft.data.packing import pack_groups


class DFTDataSampler(MegatronDataSampler):
    """Megatron data sampler whose batch sizes count prompts (groups of 1 + m sequences).

    The pipeline schedule sizes its activation buffers in sequences, so each step is told
    ``micro_batch_size * (1 + m)`` rows of ``seq_len`` tokens.
    """

    def __init__(self, *, group_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group_size = group_size

    def on_megatron_step_start(self, step: MegatronStep) -> MegatronStep:
        step = super().on_megatron_step_start(step)
        return dataclasses.replace(step, micro_batch_size=self.micro_batch_size * self.group_size)


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
    ) -> None:
        super().__init__()
        self.train_dataset = train
        self.validation_dataset = validation
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        width = train.settings.max_length - 1
        self.seq_length = width
        if packing:  # one row of whole groups end to end (nemo_dft.data.packing)
            if fixed_length or negatives_only:
                raise ValueError("packed micro-batches have one row of varying length (no pipeline parallelism)")
            self.collate = functools.partial(pack_groups, pad_id=pad_id)
        else:
            self.collate = functools.partial(collate_groups, pad_id=pad_id, pad_to=width if fixed_length else None,
                                             negatives_only=negatives_only)
        self.num_workers = num_workers
        self.init_global_step = 0
        self.data_sampler = DFTDataSampler(
            group_size=train.settings.num_negatives + (0 if negatives_only else 1),
            seq_len=width,
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
