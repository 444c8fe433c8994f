"""``DFTModel``: a NeMo 2 ``llm.GPTModel`` trained with the DFT objective.

Everything architecture-specific stays in NeMo's GPT config (GPT, Llama, Mistral, ...); the data
and forward steps come from :class:`nemo_dft.modeling.logprob_model.LogProbGPTModel`; this subclass
adds the loss reductions, the u table and the optional frozen reference.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from nemo.collections import llm

from nemo_dft.modeling.logprob_model import LogProbGPTModel, packed_aware_forward
from nemo_dft.modeling.logprobs import select_negatives, token_logps
from nemo_dft.modeling.lora import AdapterFreeReference, LoRASettings, apply_lora
from nemo_dft.platform.collectives import broadcast_from_last_stage
from nemo_dft.training.loss_reduction import DFTHyperParameters, DFTLossReduction, summarize
from nemo_dft.training.u_table import UTable, step_epochs


class DFTModel(LogProbGPTModel):
    """GPT-family model whose training step is DFT (reference-based) or DFT2 (reference-free)."""

    def __init__(
        self,
        config: llm.GPTConfig,
        dft: DFTHyperParameters,
        num_train_examples: int,
        u_init: float = 0.0,
        reference_dir: str | None = None,
        optim=None,
        tokenizer=None,
        model_transform=None,
        lora: LoRASettings | None = None,
    ) -> None:
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self.dft = dft
        self.lora = lora  # LoRA adapters on the frozen model; the reference is the model without them
        self.u_table = UTable(num_train_examples, u_init)
        self.reference_dir = reference_dir
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of parameters() and the optimizer
        self.last_train_metrics: dict[str, float] = {}
        self.nonfinite_guard = None  # a NonFiniteGuard, told of every training micro-batch
        self.eval_totals: torch.Tensor | None = None  # summed by the evaluation reduction
        self.eval_results: list[dict[str, float]] = []  # filled by training.evaluation

    # ---- NeMo 2 extension points -------------------------------------------------------------
    def configure_model(self, vp_stage: int | None = None) -> None:
        fresh = not hasattr(self, "module")
        super().configure_model(vp_stage=vp_stage)
        if fresh and self.lora is not None:
            apply_lora(self.module, self.lora)

    def forward_step(self, batch: dict[str, torch.Tensor], with_reference: bool = False) -> torch.Tensor:
        output = self.network_output(batch)
        if not self.on_last_stage():
            return output  # hidden states for the next pipeline stage
        if with_reference:
            batch["ref_neg_token_logps"] = self.reference_token_logps(batch)
        return token_logps(output, batch["labels"], inplace=True)

    def training_step(self, batch, batch_idx=None) -> torch.Tensor:
        # under pipeline parallelism the batch arrives scored (nemo_dft.training.reference_pipeline)
        with_reference = self.dft.scores_reference_on_the_fly and not self.uses_pipelined_reference()
        return self.forward_step(batch, with_reference=with_reference)

    def validation_step(self, batch, batch_idx=None) -> torch.Tensor:
        return self.forward_step(batch, with_reference=False)

    @property
    def training_loss_reduction(self) -> DFTLossReduction:
        if not self._training_loss_reduction:
            self._training_loss_reduction = _TrainingReduction(self)
        return self._training_loss_reduction

    @property
    def validation_loss_reduction(self) -> DFTLossReduction:
        if not self._validation_loss_reduction:
            self._validation_loss_reduction = _EvaluationReduction(self)
        return self._validation_loss_reduction

    # ---- frozen reference ---------------------------------------------------------------------
    def uses_pipelined_reference(self) -> bool:
        """True when the frozen reference is scored in its own forward-only pipeline pass."""
        return self.dft.scores_reference_on_the_fly and parallel_state.get_pipeline_model_parallel_world_size() > 1

    def reference_module(self) -> torch.nn.Module:
        if not self._reference:
            raise RuntimeError("reference-based DFT needs the frozen reference; call setup_reference() first")
        return self._reference[0]

    def reference_token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token reference log-probs of the negative rows only ([B * m, S]): the loss never
        reads the positives' reference scores, so the frozen reference does not compute them."""
        reference = self.reference_module()
        negatives = select_negatives(batch, 1 + self.dft.num_negatives)
        with torch.no_grad():
            logits = packed_aware_forward(reference, negatives)
            return token_logps(logits, negatives["labels"], inplace=True)

    def setup_reference(self) -> None:
        """Build the frozen copy of the initial weights on this rank's shard.

        On a fresh run the copy is taken from the policy and saved under ``reference_dir``; a
        resumed run loads that file, because its policy weights are no longer the initial ones.
        """
        if not self.dft.scores_reference_on_the_fly or self._reference:
            return
        from megatron.core.utils import unwrap_model

        policy = unwrap_model(self.module)
        if self.lora is not None:  # the policy itself with its adapters off: nothing to copy or save
            self._reference.append(AdapterFreeReference(policy))
            return
        config = copy.copy(self.config)
        config.perform_initialization = False  # weights are overwritten below; keep the RNG untouched
        reference = config.configure_model(
            self.tokenizer, pre_process=policy.pre_process, post_process=policy.post_process
        )
        path = self._reference_file()
        if path is not None and path.exists() and self.trainer.global_step > 0:
            state = torch.load(path, map_location="cpu", weights_only=True)
        elif self.trainer.global_step > 0:
            raise RuntimeError(
                "resuming reference-based DFT needs the saved initial weights "
                f"({path}); they are written on the first start of a run"
            )
        else:
            state = {k: v.detach().clone() for k, v in policy.state_dict().items() if v is not None}
            # data-parallel replicas hold the same shard: one writer per (TP, PP) file
            if path is not None and parallel_state.get_data_parallel_rank() == 0:
                _atomic_torch_save(state, path)
        reference.load_state_dict(state, strict=False)
        reference.to(next(policy.parameters()).device).eval().requires_grad_(False)
        self._reference.append(reference)

    def _reference_file(self) -> Path | None:
        if self.reference_dir is None:
            return None
        tp = parallel_state.get_tensor_model_parallel_rank()
        pp = parallel_state.get_pipeline_model_parallel_rank()
        return Path(self.reference_dir) / f"initial_weights_tp{tp}_pp{pp}.pt"

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        from megatron.core.utils import unwrap_model

        self.u_table.to(next(unwrap_model(self.module).parameters()).device)  # lookups without host copies
        self.setup_reference()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Tell the u table how this step exchanges its updates (see nemo_dft.training.u_table)."""
        epochs = self._step_epochs()
        packed_rows = getattr(self._data_sampler(), "pack_length", None) is not None
        self.u_table.begin_step(exchange_each_micro_batch=epochs is None or len(epochs) > 1,
                                epochs=(epochs or [0]) if packed_rows else None)

    def _data_sampler(self):
        return getattr(getattr(self.trainer, "datamodule", None), "data_sampler", None)

    def _step_epochs(self) -> list[int] | None:
        """The epochs this step's global batch spans; None when its position is unknown."""
        sampler = self._data_sampler()
        if sampler is None or getattr(sampler, "rampup_batch_size", None) is not None:
            return None
        global_batch = sampler.global_batch_size
        steps = self.trainer.global_step - sampler.init_global_step
        first_item = sampler.init_consumed_samples + steps * global_batch
        return step_epochs(first_item, global_batch, len(self.u_table))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _sync_u_table_across_pipeline(self.u_table)
        _check_u_table_consistent(self.u_table)
        checkpoint["dft_u_table"] = self.u_table.state_dict()
        if self.nonfinite_guard is not None:
            checkpoint["dft_nonfinite_skipped"] = self.nonfinite_guard.skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "dft_u_table" in checkpoint:
            self.u_table.load_state_dict(checkpoint["dft_u_table"])
        if self.nonfinite_guard is not None:
            self.nonfinite_guard.skipped = int(checkpoint.get("dft_nonfinite_skipped", 0))


class _TrainingReduction(DFTLossReduction):
    def __init__(self, model: DFTModel) -> None:
        super().__init__(model.dft, model.u_table, evaluation=False)
        self._model = [model]

    def forward(self, batch, forward_out):
        loss_sum, count, extra = super().forward(batch, forward_out)
        guard = self._model[0].nonfinite_guard
        if guard is not None:
            index = batch["example_index"]
            guard.note_micro_batch(index, loss_sum.detach(), self.u_table.lookup(index))
        return loss_sum, count, extra

    def reduce(self, losses_reduced_per_micro_batch):
        reduced = super().reduce(losses_reduced_per_micro_batch)
        self._model[0].last_train_metrics = {k: float(v) for k, v in reduced.items()}
        return reduced


class _EvaluationReduction(DFTLossReduction):
    """Accumulates ranking statistics over the whole held-out pass; returns -mean pos log-prob."""

    def __init__(self, model: DFTModel) -> None:
        super().__init__(model.dft, None, evaluation=True)
        self._model = [model]

    def reduce(self, losses_reduced_per_micro_batch):
        if not losses_reduced_per_micro_batch:
            return torch.tensor(0.0)
        totals = torch.stack([m["stats"] for m in losses_reduced_per_micro_batch]).sum(dim=0)
        group = parallel_state.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(totals, group=group)
        model = self._model[0]
        model.eval_totals = totals if model.eval_totals is None else model.eval_totals + totals
        return -summarize(totals)["pos_logps"]


def _sync_u_table_across_pipeline(u_table: UTable) -> None:
    """Only the last pipeline stage updates u; copy its table to the other stages."""
    broadcast_from_last_stage(u_table.values)


def _check_u_table_consistent(u_table: UTable) -> None:
    """Every rank must hold the same u table; a checkpoint of diverged tables would be wrong."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    tables = [torch.empty_like(u_table.values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(tables, u_table.values)
    for rank, table in enumerate(tables):
        if not torch.equal(table, u_table.values):
            raise RuntimeError(f"the u table of rank {rank} differs from this rank's; refusing to checkpoint it")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
