"""The per-example moving estimator u, one float per training example.

Every data-parallel rank holds the whole table and trains on different examples, but must see
every update.  The table lives on the training device, so a micro-batch's lookup and write are
device operations (no host synchronisation).  Updates are exchanged once per optimizer step:

- u is looked up per micro-batch, from this rank's copy.  Within one step the examples of all
  micro-batches on all ranks are distinct (consecutive items of one epoch's order), so every
  lookup reads the value the step started with, whichever rank updated the other examples; a
  micro-batch's new values are written into this rank's copy at once and kept in a list.
- at the step's end (the loss reduction's ``reduce``) one all-gather over the data-parallel
  group brings every rank's new values of the step, and each rank writes them all.

The table is then identical everywhere after each step and holds exactly what the former
per-micro-batch exchange produced.  A step whose global batch crosses an epoch boundary can hold
the same example twice (once per epoch), where a later micro-batch must see the earlier one's
update: for such a step (:func:`step_crosses_epoch`) the values are exchanged after every
micro-batch, as before.

Rows of ``data.pack_length`` give the ranks different numbers of micro-batches of different
sizes, so no per-micro-batch collective can line up.  There a crossing step exchanges once per
epoch instead: a row holds groups of one epoch only and a rank trains the earlier epoch's rows
first, so before the first lookup of a later epoch every rank sends all its updates so far
(:meth:`UTable.close_epochs_before`), and a rank with no rows of that epoch sends them after its
last row (:meth:`UTable.close_epochs_after_last_row`).  Both happen inside the micro-batches'
forward passes, before megatron's gradient reduction, so every rank makes the same collectives in
the same order; a recurring example reads its earlier occurrence's value, as one process
training the groups in order would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def step_epochs(first_item: int, global_batch: int, num_examples: int) -> list[int]:
    """The epochs that items ``first_item .. first_item + global_batch - 1`` (unrolled over epochs
    of ``num_examples``) belong to."""
    return list(range(first_item // num_examples, (first_item + global_batch - 1) // num_examples + 1))


def step_crosses_epoch(first_item: int, global_batch: int, num_examples: int) -> bool:
    """True when the step's items span more than one epoch, so that an example may occur twice."""
    return len(step_epochs(first_item, global_batch, num_examples)) > 1


class UTable:
    """u values indexed by example position (0..N-1) in the training set."""

    def __init__(self, num_examples: int, u_init: float = 0.0) -> None:
        if num_examples < 1:
            raise ValueError("the u table needs at least one example")
        self.values = torch.full((num_examples,), float(u_init), dtype=torch.float32)
        self.exchange_each_micro_batch = True  # until begin_step says otherwise (safe default)
        self._pending: list[torch.Tensor] = []  # [2, b] (index, u) of this rank's micro-batches this step
        self.exchanges = 0  # all-gathers done, for tests
        self._uneven = False  # rows of data.pack_length: exchanges that allow per-rank sizes to differ
        self._open_epochs: list[int] = []  # earlier epochs of a crossing step not yet exchanged

    def __len__(self) -> int:
        return self.values.numel()

    def to(self, device: torch.device | str) -> UTable:
        """Keep the table on the training device (lookups and writes without host copies)."""
        self.values = self.values.to(device)
        return self

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.values[index.to(self.values.device, non_blocking=True)].to(index.device, non_blocking=True)

    def begin_step(self, exchange_each_micro_batch: bool, epochs: Sequence[int] | None = None) -> None:
        """Start an optimizer step: exchange per micro-batch (a step crossing an epoch boundary)
        or once at :meth:`end_step`.  ``epochs`` (rows of ``data.pack_length``): the epochs a
        crossing step's global batch spans; the step then exchanges once per epoch instead."""
        self._pending = []
        self._uneven = epochs is not None
        self.exchange_each_micro_batch = exchange_each_micro_batch and not self._uneven
        self._open_epochs = sorted(epochs)[:-1] if epochs is not None else []

    def close_epochs_before(self, epoch: Callable[[], int], group: dist.ProcessGroup | None = None) -> None:
        """Before a micro-batch's lookup (rows of ``data.pack_length``): exchange this rank's
        updates so far once for every earlier epoch of the step not yet closed.  ``epoch`` gives
        the micro-batch's epoch; it is read (one host copy) only in a step that crosses epochs."""
        if not self._open_epochs or not _distributed(group):
            return
        current = epoch()
        while self._open_epochs and self._open_epochs[0] < current:
            self._close_epoch(group)

    def close_epochs_after_last_row(self, last_row: Callable[[], bool], group: dist.ProcessGroup | None = None) -> None:
        """After a micro-batch's update (rows of ``data.pack_length``): on the step's last row,
        exchange once for every epoch still open (those after this rank's rows), so that every
        rank has made all of the step's per-epoch exchanges before the gradient reduction."""
        if not self._open_epochs or not _distributed(group) or not last_row():
            return
        while self._open_epochs:
            self._close_epoch(group)

    def _close_epoch(self, group: dist.ProcessGroup) -> None:
        self._open_epochs.pop(0)
        pending, self._pending = self._pending, []
        self._exchange(pending, group)

    def update(self, index: torch.Tensor, u_new: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Write ``u_new`` for ``index`` on this rank now; on every rank of ``group`` now (per
        micro-batch exchange) or at :meth:`end_step`."""
        index = index.detach().long().to(self.values.device, non_blocking=True)
        u_new = u_new.detach().float().to(self.values.device, non_blocking=True)
        if not _distributed(group):
            self.values[index] = u_new
        elif self.exchange_each_micro_batch:
            self._exchange([self._pack(index, u_new)], group)
        else:
            self.values[index] = u_new
            self._pending.append(self._pack(index, u_new))

    def end_step(self, group: dist.ProcessGroup | None = None) -> None:
        """The step's one exchange: every rank writes every rank's new values of the step."""
        if self._open_epochs and _distributed(group):
            raise RuntimeError(f"u table: epochs {self._open_epochs} of a step crossing epochs were not exchanged "
                               "before its end (no row marked last_row)")
        pending, self._pending = self._pending, []
        if _distributed(group) and (pending or self._uneven):  # uneven: a rank without updates takes part too
            self._exchange(pending, group)

    def _dtype(self) -> torch.dtype:
        return torch.float64 if len(self) >= 2**24 else torch.float32  # indices exact in fp32 below 2**24

    def _pack(self, index: torch.Tensor, u_new: torch.Tensor) -> torch.Tensor:
        return torch.stack([index.to(self._dtype()), u_new.to(self._dtype())])

    def _exchange(self, parts: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        """All-gather of every rank's (index, u) columns; each rank writes them all.  Padded
        micro-batches give every rank the same count.  Rows of ``data.pack_length`` (``_uneven``)
        do not, and a rank may have none: each rank's part is padded to the largest with index -1,
        which no rank writes."""
        empty = torch.empty(2, 0, dtype=self._dtype(), device=self.values.device)
        packed = torch.cat(parts, dim=1) if parts else empty
        if self._uneven:
            size = torch.tensor([packed.shape[1]], device=packed.device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
            packed = torch.cat([packed, packed.new_full((2, int(size) - packed.shape[1]), -1)], dim=1)
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        self.exchanges += 1
        both = torch.cat(gathered, dim=1)
        if self._uneven:
            both = both[:, both[0] >= 0]
        self.values[both[0].long()] = both[1].float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        values = state["values"]
        if values.shape != self.values.shape:
            raise ValueError(
                f"the checkpoint's u table has {values.numel()} entries, the training set {len(self)}"
            )
        self.values.copy_(values)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
