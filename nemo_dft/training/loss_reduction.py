"""DFT as a NeMo 2 ``MegatronLossReduction``: the bridge from Megatron micro-batches to
:func:`nemo_dft.objective.dft_loss` (or :func:`~nemo_dft.objective.sft_loss`, the baseline).

Runs on the last pipeline stage.  ``forward`` sees one micro-batch: per-token log-probs of its
R = B (1 + m) rows, reduces them to sequence scores, evaluates the objective and updates u;
``reduce`` combines the micro-batches of a global batch over the data-parallel group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from nemo.lightning.megatron_parallel import MegatronLossReduction

from nemo_dft.data.packing import is_packed, packed_negative_sub_batch, packed_sequence_logps
from nemo_dft.modeling.logprobs import negative_sub_batch, sequence_logps, split_groups
from nemo_dft.objective import dft_loss, length_average, sft_loss

if TYPE_CHECKING:
    from nemo_dft.training.u_table import UTable

# Sums carried per micro-batch; means are taken over the global batch in ``reduce``.
STAT_NAMES = ("loss", "examples", "u", "weight", "pos_logps", "neg_logps", "rank_correct", "response_tokens", "tokens",
              "padded_tokens", "padded_token_pairs", "loss_count")


@dataclass(frozen=True)
class DFTHyperParameters:
    """The objective's settings (see dft-algorithm.md)."""

    tau: float
    gamma: float
    num_negatives: int
    ref_free: bool
    reference: str = "frozen"  # where reference log-probs come from: frozen (scored each step) | offline (file)
    objective: str = "dft"  # dft | dft2 | sft (ref_free then true: no reference either)

    @property
    def scores_reference_on_the_fly(self) -> bool:
        return not self.ref_free and self.reference == "frozen"


def _data_parallel_group() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group()


class DFTLossReduction(MegatronLossReduction):
    """Training (updates u) or evaluation (ranking statistics only) reduction."""

    def __init__(self, hparams: DFTHyperParameters, u_table: UTable | None, evaluation: bool = False) -> None:
        super().__init__()
        if not evaluation and u_table is None:
            raise ValueError("the training reduction needs the u table")
        self.hparams = hparams
        self.u_table = u_table
        self.evaluation = evaluation

    def group_scores(self, batch: dict[str, torch.Tensor], token_logps: torch.Tensor, key: str = "loss_mask"):
        if is_packed(batch):  # data.packing: sequences end to end in one row
            rows = batch["lengths"].numel()
            sums, lengths = packed_sequence_logps(token_logps, batch[key], batch["segment_ids"], rows)
        else:
            sums, lengths = sequence_logps(token_logps, batch[key])
        group_size = 1 + self.hparams.num_negatives
        return split_groups(sums, group_size), split_groups(lengths, group_size)

    def negative_scores(self, batch: dict[str, torch.Tensor], neg_token_logps: torch.Tensor) -> torch.Tensor:
        """[B, m] summed response log-probs from per-token log-probs of the negative rows alone."""
        m = self.hparams.num_negatives
        if is_packed(batch):
            # the pipelined reference pads every row of a step to one width: take the scores' own
            negatives = packed_negative_sub_batch(batch, 1 + m, width=neg_token_logps.shape[-1])
            sums, _ = packed_sequence_logps(neg_token_logps, negatives["loss_mask"], negatives["segment_ids"],
                                            batch["lengths"].numel() // (1 + m) * m)
        else:
            mask = negative_sub_batch(batch, 1 + m, keys=("tokens", "loss_mask"))["loss_mask"]
            sums, _ = sequence_logps(neg_token_logps, mask)
        return sums.view(-1, m)

    def forward(
        self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        (pos, neg), (pos_len, neg_len) = self.group_scores(batch, forward_out)
        examples = pos.shape[0]
        # Statistics stay on the device (no host copy per micro-batch); ``reduce`` sums them once per step.
        stats: dict[str, torch.Tensor | float] = dict.fromkeys(STAT_NAMES, 0.0)
        if self.evaluation and "valid" in batch:  # held-out padding groups count nowhere
            counted = batch["valid"].to(pos.device, pos.dtype)
        else:
            counted = torch.ones_like(pos)
        stats["examples"] = counted.sum()
        stats["pos_logps"] = (pos.detach() * counted).sum()
        has_negatives = neg.shape[-1] > 0  # SFT may run without negatives (dft.num_negatives=0)
        stats["neg_logps"] = (neg.detach().mean(dim=-1) * counted).sum() if has_negatives else 0.0
        correct = (length_average(pos, pos_len).unsqueeze(-1) > length_average(neg, neg_len)).all(dim=-1)
        correct = correct & has_negatives
        stats["rank_correct"] = (correct.to(counted.dtype) * counted).sum().detach()
        rows_counted = counted.repeat_interleave(1 + self.hparams.num_negatives)
        stats["response_tokens"] = (pos_len * counted).sum() + (neg_len.sum(dim=-1) * counted).sum()
        stats["tokens"] = (batch["lengths"].to(counted.device, counted.dtype) * rows_counted).sum()
        rows, width = batch["loss_mask"].shape  # computed positions, for the FLOPs count (throughput.py)
        stats["padded_tokens"] = rows * width
        if is_packed(batch):  # THD attention runs per sequence: the sum of squared lengths, not width^2
            stats["padded_token_pairs"] = batch["lengths"].to(pos.device, torch.float64).square().sum()
        else:
            stats["padded_token_pairs"] = rows * width * width
        stats["loss_count"] = stats["examples"]  # the loss is a mean over prompts (SFT: over positive tokens)
        count = torch.full((), examples, dtype=torch.long, device=pos.device)
        if self.evaluation:
            loss_sum = (pos.sum() * 0.0).detach()
            return loss_sum, count, {"stats": _stack(stats, pos.device)}
        if self.hparams.objective == "sft":
            return self._sft_forward(pos, pos_len, stats)

        ref_neg = None
        if not self.hparams.ref_free:
            if "ref_neg_logps" in batch:  # offline: read from the precomputed file with the batch
                ref_neg = batch["ref_neg_logps"].to(neg.dtype)
            else:  # the frozen reference scored the negative rows only (B * m of them)
                ref_neg = self.negative_scores(batch, batch["ref_neg_token_logps"])
        index = batch["example_index"]
        # rows of data.pack_length in a step crossing epochs: earlier epochs' u reach every rank first
        self.u_table.close_epochs_before(lambda: int(batch["epoch"][0]), group=_data_parallel_group())
        result = dft_loss(
            pos,
            neg,
            self.u_table.lookup(index),
            tau=self.hparams.tau,
            gamma=self.hparams.gamma,
            ref_neg_logps=ref_neg,
            pos_lengths=pos_len,
            neg_lengths=neg_len,
            with_metrics=False,
        )
        self.u_table.update(index, result.u, group=_data_parallel_group())
        if "last_row" in batch:
            self.u_table.close_epochs_after_last_row(lambda: bool(batch["last_row"]), group=_data_parallel_group())
        loss_sum = result.loss * examples
        stats["loss"] = loss_sum.detach()
        stats["u"], stats["weight"] = result.u.sum(), result.weights.mean(dim=-1).sum()
        # megatron divides the returned loss by the returned count and the number of
        # micro-batches, so every micro-batch contributes its mean over examples.
        return loss_sum, count, {"stats": _stack(stats, pos.device)}

    def _sft_forward(self, pos: torch.Tensor, pos_len: torch.Tensor, stats: dict[str, torch.Tensor | float]):
        """The SFT baseline: the summed NLL and the number of positive tokens.  The model config
        sets ``calculate_per_token_loss`` for SFT, so megatron sums these over micro-batches and
        data-parallel ranks and divides the gradients by the global token count: every layout of a
        global batch takes the same token mean."""
        result = sft_loss(pos, pos_len)
        tokens = result.tokens.round().to(torch.int64)
        stats["loss"], stats["loss_count"] = result.nll_sum.detach(), tokens
        return result.nll_sum, tokens.to(pos.device), {"stats": _stack(stats, pos.device)}

    def reduce(self, losses_reduced_per_micro_batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Global-batch means over all micro-batches and data-parallel ranks; in training also the
        step's one exchange of u (:meth:`UTable.end_step`)."""
        if not losses_reduced_per_micro_batch:
            return {"loss": torch.tensor(0.0)}
        group = _data_parallel_group()
        if not self.evaluation:
            self.u_table.end_step(group)
        totals = torch.stack([m["stats"] for m in losses_reduced_per_micro_batch]).sum(dim=0)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, group=group)
        return summarize(totals)


def _stack(stats: dict[str, torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """The statistics as one float64 vector on ``device`` (Python numbers are written by a fill,
    tensors stay where they are: nothing is copied to the host)."""
    return torch.stack([v.detach().to(torch.float64).reshape(()) if torch.is_tensor(v)
                        else torch.full((), float(v), dtype=torch.float64, device=device)
                        for v in (stats[name] for name in STAT_NAMES)])


def summarize(totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn summed statistics into the logged means."""
    stats = dict(zip(STAT_NAMES, totals, strict=True))
    n = stats["examples"].clamp(min=1)
    return {
        "loss": (stats["loss"] / stats["loss_count"].clamp(min=1)).float(),
        "u_mean": (stats["u"] / n).float(),
        "weight_mean": (stats["weight"] / n).float(),
        "pos_logps": (stats["pos_logps"] / n).float(),
        "neg_logps": (stats["neg_logps"] / n).float(),
        "rank_acc": (stats["rank_correct"] / n).float(),
        "examples": stats["examples"].float(),
        "response_tokens": stats["response_tokens"].float(),
        "tokens": stats["tokens"].float(),
        "padded_tokens": stats["padded_tokens"].float(),
        "padded_token_pairs": stats["padded_token_pairs"].float(),
    }
