"""The frozen reference under pipeline parallelism: a forward-only pipeline pass per step.

With one pipeline stage the reference runs inside the policy's forward step (``DFTModel``).  With
several, each stage holds only its layers of the reference, so scoring needs the stages to pass
activations like the policy does.  Nesting a second pipeline schedule inside the policy's would
deadlock (the later stages wait in their receive while the first stage starts the nested pass), so
the reference pass runs just before the policy's schedule: this callback takes the step's
micro-batches from the data iterator once the data sampler has set the step up (rows of
``data.pack_length`` are packed there), lets megatron's forward-only schedule run the reference
stages over them, attaches the per-token log-probs of the negative rows on the last stage
(``batch["ref_neg_token_logps"]``, the same key the single-stage path fills: the positives'
reference scores are never used, so only the B * m negative rows go through the reference) and
hands the same micro-batches to the policy's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from nemo_dft.modeling.logprob_model import logprob_data_step, packed_aware_forward
from nemo_dft.modeling.logprobs import select_negatives, token_logps


def _negatives(batches: list[dict[str, torch.Tensor]], group_size: int) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch's negative rows; packed rows are re-packed to one width for the whole step
    (the longest negatives of any row, rounded up to 8), since a pipeline needs one shape."""
    if "segment_ids" not in batches[0]:
        return [select_negatives(batch, group_size) for batch in batches]
    from nemo_dft.data.packing import packed_negative_sub_batch, step_negative_width

    width = step_negative_width(batches, group_size)
    return [packed_negative_sub_batch(batch, group_size, width=width) for batch in batches]


def _unwrap(item: Any) -> dict[str, torch.Tensor]:
    return item[0] if isinstance(item, tuple) else item  # (batch, batch_idx, dataloader_idx)


def score_micro_batches(reference: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                        last_stage: bool, group_size: int) -> None:
    """Run ``reference`` (this rank's pipeline stage) over the negative rows of ``batches`` in
    megatron's forward-only schedule; on the last stage put each micro-batch's per-token log-probs
    of its negatives under ``ref_neg_token_logps``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model) -> tuple[torch.Tensor, Callable]:
        batch = logprob_data_step(data_iterator)
        output = packed_aware_forward(model, batch)

        def collect(output_tensor: torch.Tensor):
            logps = token_logps(output_tensor, batch["labels"], inplace=True)
            return output_tensor.new_zeros(()), {"ref_neg_token_logps": logps}

        return output, collect

    negatives = _negatives(batches, group_size)
    tokens = negatives[0]["tokens"]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(negatives),
            model=[reference],
            num_microbatches=len(batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    if last_stage:
        for batch, output in zip(batches, outputs, strict=True):
            batch["ref_neg_token_logps"] = output["ref_neg_token_logps"]


class PipelinedReference(pl.Callback):
    """Scores each training step's micro-batches with the frozen reference before the policy runs."""

    def __init__(self) -> None:
        self._model: Any = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._model = pl_module

    def on_megatron_microbatches_start(self, step) -> None:
        """After every ``on_megatron_step_start`` transform (the data sampler's included), just
        before the policy's schedule reads ``step.data``."""
        model = self._model
        if step.forward_only or model is None or not model.uses_pipelined_reference():
            return
        items = [next(step.data) for _ in range(step.num_microbatches)]
        model.setup_reference()
        score_micro_batches(model.reference_module(), [_unwrap(item) for item in items], model.on_last_stage(),
                            1 + model.dft.num_negatives)
        step.data = iter(items)
