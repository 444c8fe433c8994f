"""Worker for test_u_exchange: 2 gloo ranks train the same steps with the u table exchanged after
every micro-batch and once per step; both tables and every looked-up u must agree."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nemo_dft.training.u_table import UTable

EXAMPLES, MICRO, PER_MICRO = 24, 3, 2  # 2 ranks x 3 micro-batches x 2 examples = 12 per step


def step_indices(step: int, rank: int, order: list[int]) -> list[list[int]]:
    """Megatron's sampler layout: micro-batch k of rank r takes items k*4 + 2r .. k*4 + 2r + 1."""
    first = step * MICRO * PER_MICRO * 2
    return [[order[(first + k * 4 + rank * 2 + i) % len(order)] for i in range(PER_MICRO)] for k in range(MICRO)]


def train(once_per_step: bool, rank: int, order: list[int], steps: int) -> tuple[torch.Tensor, list, int]:
    table = UTable(EXAMPLES, 0.25)
    seen = []
    generator = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        table.begin_step(exchange_each_micro_batch=not once_per_step)
        for indices in step_indices(step, rank, order):
            index = torch.tensor(indices)
            u = table.lookup(index)
            seen.append(u.clone())
            table.update(index, 0.85 * u + torch.randn(len(indices), generator=generator), group=dist.group.WORLD)
        table.end_step(group=dist.group.WORLD)
    return table.values, seen, table.exchanges


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(3)).tolist()
    results = {mode: train(mode == "once", rank, order, steps=2) for mode in ("each", "once")}
    tables = [torch.empty(EXAMPLES) for _ in range(world)]
    dist.all_gather(tables, results["once"][0])
    if rank == 0:
        torch.save({"results": results, "tables": tables}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
