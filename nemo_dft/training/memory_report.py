"""What each rank holds for the optimizer, written to ``run.dir/memory.json`` at the end of training.

With megatron-core's distributed optimizer the Adam moments (and the fp32 main weights of a bf16
run) of each parameter live on one data-parallel rank only; this report shows that split, so a
user can check the memory a layout saves before scaling it up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from nemo_dft.data.io import write_text_atomic


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside NeMo's and megatron's wrappers (chained, distributed, mixed precision)."""
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "mcore_optimizer"):
        return [optimizer]
    for attribute in ("mcore_optimizer", "chained_optimizers", "optimizer"):
        inner = getattr(optimizer, attribute, None)
        if inner is None:
            continue
        inner_list = inner if isinstance(inner, list | tuple) else [inner]
        return [found for item in inner_list for found in torch_optimizers(item)]
    return []


def optimizer_state_bytes(optimizers: list[Any]) -> int:
    """Bytes of this rank's optimizer state tensors (Adam's moments; scalar step counters aside)."""
    total = 0
    for optimizer in optimizers:
        for inner in torch_optimizers(optimizer):
            for state in inner.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


class OptimizerMemoryReport(pl.Callback):
    """Gathers every rank's optimizer-state bytes at the end of training; rank 0 writes the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        mine = torch.tensor([optimizer_state_bytes(trainer.optimizers), trainable], dtype=torch.float64)
        if torch.distributed.is_initialized():
            gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, mine)
        else:
            gathered = [mine]
        if trainer.global_rank != 0:
            return
        report = {"optimizer_state_bytes_per_rank": [int(t[0].item()) for t in gathered],
                  # parameters the optimizer trains (LoRA: the adapters only), this rank's shards
                  "trainable_parameters_per_rank": [int(t[1].item()) for t in gathered],
                  "use_distributed_optimizer": bool(getattr(trainer.strategy.ddp_config, "use_distributed_optimizer",
                                                            False))}
        write_text_atomic(self.path, json.dumps(report, indent=2) + "\n")
