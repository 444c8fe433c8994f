"""The per-example moving estimator u, one float per training example.

Every data-parallel rank trains on different examples but must see every update: after each
micro-batch the new values are all-gathered over the data-parallel group and written on all
ranks, so the table is identical everywhere within the same optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class UTable:
    """u values indexed by example position (0..N-1) in the training set."""

    def __init__(self, num_examples: int, u_init: float = 0.0) -> None:
        if num_examples < 1:
            raise ValueError("the u table needs at least one example")
        self.values = torch.full((num_examples,), float(u_init), dtype=torch.float32)

    def __len__(self) -> int:
        return self.values.numel()

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.values[index.cpu()].to(index.device)

    def update(self, index: torch.Tensor, u_new: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Write ``u_new`` for ``index`` on this rank and on every rank of ``group``."""
        index, u_new = index.detach().long(), u_new.detach().float()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            world = dist.get_world_size(group)
            packed = torch.stack([index.to(u_new.dtype), u_new])  # indices are exact in fp32 below 2**24
            if len(self) >= 2**24:
                packed = packed.double()
            gathered = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(gathered, packed, group=group)
            both = torch.cat(gathered, dim=1)
            index, u_new = both[0].long(), both[1].float()
        self.values[index.cpu()] = u_new.cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        values = state["values"]
        if values.shape != self.values.shape:
            raise ValueError(
                f"the checkpoint's u table has {values.numel()} entries, the training set {len(self)}"
            )
        self.values.copy_(values)
