"""``LogProbGPTModel``: a NeMo 2 ``llm.GPTModel`` whose forward step returns per-token log-probs.

The common base of training's ``DFTModel`` and the offline scoring pass's model: the data step
and the forward step that turns the last pipeline stage's logits into log p(label_t | prefix).
Everything architecture-specific stays in NeMo's GPT config (GPT, Llama, Mistral, ...).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from nemo.collections import llm

from nemo_dft.modeling.logprobs import token_logps


def logprob_data_step(dataloader_iter) -> dict[str, torch.Tensor]:
    """Next micro-batch, moved to the GPU when there is one (NeMo's own step always calls .cuda())."""
    batch = next(dataloader_iter)
    if isinstance(batch, tuple):  # NeMo's iterators may yield (batch, batch_idx, dataloader_idx)
        batch = batch[0]
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def packed_aware_forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(tokens, position_ids, mask)``; a packed batch (``data.packing``) runs in THD format
    (:mod:`nemo_dft.modeling.packed_attention`)."""
    if "segment_ids" not in batch:
        return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    from nemo_dft.modeling.packed_attention import packed_forward_kwargs, prepare_packed

    kwargs = packed_forward_kwargs(batch, prepare_packed(model))
    return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=kwargs["packed_seq_params"])


class LogProbGPTModel(llm.GPTModel):
    """GPT-family model whose forward step yields per-token log-probs of ``batch["labels"]``."""

    def data_step(self, dataloader_iter) -> dict[str, torch.Tensor]:
        return logprob_data_step(dataloader_iter)

    def network_output(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits on the last pipeline stage, hidden states for the next stage elsewhere."""
        return packed_aware_forward(self, batch)

    def on_last_stage(self) -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=self._vp_stage())

    def forward_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.network_output(batch)
        if not self.on_last_stage():
            return output  # hidden states for the next pipeline stage
        return token_logps(output, batch["labels"], inplace=True)

    def validation_step(self, batch, batch_idx=None) -> torch.Tensor:
        return self.forward_step(batch)

    def _vp_stage(self) -> int | None:
        return getattr(self.module, "vp_stage", None) if hasattr(self, "module") else None
