"""Small collectives over Megatron's process groups."""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def broadcast_from_last_stage(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` on every pipeline stage with the last stage's values (in place).

    Only the last stage computes the loss, u and the metrics; the other stages need them to log
    and to checkpoint.
    """
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a world-wide all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
