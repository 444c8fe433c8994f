"""What each rank holds for the optimizer, written to ``run.dir/memory.json`` at the end of training.

With megatron-core's distributed optimizer the Adam moments (and the fp32 main weights of a bf16
run) of each parameter live on one data-parallel rank only; this report shows that split, so a
user can check the memory a layout saves before scaling it up.  It also gives each rank's weight,
gradient-buffer and reference-copy bytes: the static part of the memory plan
(``nemo_dft/training/memory_plan.py``), which tests compare with it.
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


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def static_bytes(pl_module: Any) -> tuple[int, int, int]:
    """(weights, gradient buffers, reference copy) bytes of this rank's shard: every parameter, frozen
    ones included; the gradients of the trainable ones (megatron's ``main_grad`` buffers, or
    ``.grad``); the parameters of a frozen reference that are not the policy's own."""
    parameters = list(pl_module.parameters())
    gradients = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
                 for p in parameters if p.requires_grad]
    own = {id(p) for p in parameters}
    references = getattr(pl_module, "_reference", [])  # DFTModel keeps it out of parameters()
    copy = [p for reference in references for p in reference.parameters() if id(p) not in own]
    return tensor_bytes(parameters), tensor_bytes(g for g in gradients if g is not None), tensor_bytes(copy)


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
        mine = torch.tensor([optimizer_state_bytes(trainer.optimizers), trainable, *static_bytes(pl_module)],
                            dtype=torch.float64)
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
                  # every weight (frozen ones too), the trainable ones' gradient buffers, a frozen reference copy
                  "weight_bytes_per_rank": [int(t[2].item()) for t in gathered],
                  "gradient_bytes_per_rank": [int(t[3].item()) for t in gathered],
                  "reference_bytes_per_rank": [int(t[4].item()) for t in gathered],
                  "use_distributed_optimizer": bool(getattr(trainer.strategy.ddp_config, "use_distributed_optimizer",
                                                            False))}
        write_text_atomic(self.path, json.dumps(report, indent=2) + "\n")
