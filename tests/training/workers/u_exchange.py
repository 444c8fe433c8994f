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


# ---- rows of data.pack_length: per-rank micro-batches of different number and size ------------------
ROW_EXAMPLES, ROW_GLOBAL, ROW_STEPS = 10, 12, 3  # every step crosses an epoch: examples recur in a step


def row_items(step: int, rank: int, world: int) -> list[tuple[int, int]]:
    """(epoch, example) of this rank's share of a step: consecutive items of the epoch-unrolled order."""
    per_rank = ROW_GLOBAL // world
    first = step * ROW_GLOBAL + rank * per_rank
    return [divmod(item, ROW_EXAMPLES) for item in range(first, first + per_rank)]


def new_u(old: torch.Tensor, epoch: int, examples: torch.Tensor) -> torch.Tensor:
    return 0.5 * old + (epoch * ROW_EXAMPLES + examples).float() / 7


def train_rows(rank: int, world: int, seed: int) -> tuple[torch.Tensor, list, int]:
    """Each epoch run of this rank's share cut into rows of random sizes and order (as the planner
    reorders them), one micro-batch per row; u updated by :func:`new_u`."""
    table = UTable(ROW_EXAMPLES, 0.25)
    generator = torch.Generator().manual_seed(seed + rank)
    seen = {}
    for step in range(ROW_STEPS):
        epochs = sorted({item // ROW_EXAMPLES for item in range(step * ROW_GLOBAL, (step + 1) * ROW_GLOBAL)})
        table.begin_step(exchange_each_micro_batch=True, epochs=epochs)
        items = row_items(step, rank, world)
        rows = []
        for epoch in sorted({e for e, _ in items}):
            run = [x for e, x in items if e == epoch]
            run = [run[i] for i in torch.randperm(len(run), generator=generator).tolist()]
            while run:
                size = int(torch.randint(1, len(run) + 1, (), generator=generator))
                rows.append((epoch, torch.tensor(run[:size])))
                run = run[size:]
        last = len(rows) - 1
        for r, (epoch, row) in enumerate(rows):
            table.close_epochs_before(lambda epoch=epoch: epoch, group=dist.group.WORLD)
            u = table.lookup(row)
            seen.update({(epoch, int(x)): float(v) for x, v in zip(row, u, strict=True)})
            table.update(row, new_u(u, epoch, row), group=dist.group.WORLD)
            table.close_epochs_after_last_row(lambda r=r, last=last: r == last, group=dist.group.WORLD)
        dist.barrier()  # megatron's gradient reduction: every epoch's exchange must come before it
        table.end_step(group=dist.group.WORLD)
    return table.values, seen, table.exchanges


def sequential_rows() -> tuple[torch.Tensor, dict]:
    """One process, every item in order: what the exchanged tables must hold."""
    values, seen = torch.full((ROW_EXAMPLES,), 0.25), {}
    for item in range(ROW_STEPS * ROW_GLOBAL):
        epoch, example = divmod(item, ROW_EXAMPLES)
        seen[(epoch, example)] = float(values[example])
        values[example] = new_u(values[example], epoch, torch.tensor(example))
    return values, seen


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(3)).tolist()
    results = {mode: train(mode == "once", rank, order, steps=2) for mode in ("each", "once")}
    tables = [torch.empty(EXAMPLES) for _ in range(world)]
    dist.all_gather(tables, results["once"][0])
    rows_table, rows_seen, rows_exchanges = train_rows(rank, world, seed=int(os.environ.get("ROW_SEED", "0")))
    row_tables = [torch.empty(ROW_EXAMPLES) for _ in range(world)]
    dist.all_gather(row_tables, rows_table)
    all_seen = [None] * world
    dist.all_gather_object(all_seen, rows_seen)
    if rank == 0:
        torch.save({"results": results, "tables": tables, "row_tables": row_tables, "row_seen": all_seen,
                    "row_exchanges": rows_exchanges}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
