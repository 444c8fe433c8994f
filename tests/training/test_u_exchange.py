"""u is exchanged once per optimizer step and the micro-batch path makes no host copy."""

from __future__ import annotations

import pytest
import torch

from nemo_dft.training.loss_reduction import DFTHyperParameters, DFTLossReduction
from nemo_dft.training.nonfinite import NonFiniteGuard
from nemo_dft.training.u_table import UTable, step_crosses_epoch


@pytest.mark.parametrize("ref_free", [False, True], ids=["dft", "dft2"])
def test_micro_batch_path_makes_no_host_copy(ref_free):
    """On the meta device every host copy (``.item()``, ``.cpu()``, writing into a CPU tensor)
    raises: the reduction's forward, the u lookup and update and the NaN guard's note run there."""
    groups, m, width = 3, 2, 7
    meta = torch.device("meta")
    batch = {"loss_mask": torch.ones(groups * (1 + m), width, device=meta),
             "lengths": torch.ones(groups * (1 + m), dtype=torch.long, device=meta),
             "example_index": torch.zeros(groups, dtype=torch.long, device=meta),
             "ref_neg_logps": torch.zeros(groups, m, device=meta)}
    table = UTable(10).to(meta)
    table.begin_step(exchange_each_micro_batch=False)
    reduction = DFTLossReduction(DFTHyperParameters(1.0, 0.85, m, ref_free), table)
    loss, count, extra = reduction.forward(batch, torch.zeros(groups * (1 + m), width, device=meta, requires_grad=True))
    assert loss.device == meta and count.device == meta and extra["stats"].device == meta
    index = batch["example_index"]
    NonFiniteGuard("stop", list(range(10))).note_micro_batch(index, loss, table.lookup(index))


def test_step_crosses_epoch():
    assert not step_crosses_epoch(0, 8, 24) and not step_crosses_epoch(16, 8, 24)
    assert step_crosses_epoch(20, 8, 24) and step_crosses_epoch(0, 8, 5)


@pytest.mark.slow
def test_one_exchange_per_step_equals_one_per_micro_batch(tmp_path):
    """2 gloo ranks, 2 steps of 3 micro-batches: identical lookups and final tables, 1 exchange per
    step instead of 3, and both ranks hold the same table."""
    from torch import multiprocessing

    from tests.training.workers.u_exchange import main

    out = tmp_path / "out.pt"
    multiprocessing.spawn(main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    saved = torch.load(out, weights_only=False)
    (each_table, each_seen, each_exchanges), (once_table, once_seen, once_exchanges) = (
        saved["results"]["each"], saved["results"]["once"])
    assert each_exchanges == 2 * 3 and once_exchanges == 2
    assert torch.equal(each_table, once_table)
    assert all(torch.equal(a, b) for a, b in zip(each_seen, once_seen, strict=True))
    assert torch.equal(saved["tables"][0], saved["tables"][1])
    assert not torch.equal(once_table, torch.full_like(once_table, 0.25))  # the steps did update u


@pytest.mark.slow
def test_rows_of_uneven_micro_batches_exchange_once_per_epoch(tmp_path, monkeypatch):
    """data.pack_length: 2 gloo ranks train 3 steps that each cross an epoch boundary (10 examples,
    12 per step, so examples recur within a step, on the same or the other rank), in micro-batches
    whose number and size differ between the ranks.  Every looked-up u and both final tables equal
    one process training every item in order; each step makes one exchange per epoch it spans."""
    from torch import multiprocessing

    from tests.training.workers.u_exchange import ROW_EXAMPLES, ROW_GLOBAL, ROW_STEPS, main, sequential_rows

    monkeypatch.setenv("ROW_SEED", str(int(torch.randint(0, 2**31, ()).item())))
    out = tmp_path / "out.pt"
    multiprocessing.spawn(main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    saved = torch.load(out, weights_only=False)
    expected_table, expected_seen = sequential_rows()
    for table in saved["row_tables"]:
        torch.testing.assert_close(table, expected_table, rtol=0, atol=0)
    seen = {**saved["row_seen"][0], **saved["row_seen"][1]}
    assert seen.keys() == expected_seen.keys()
    assert all(seen[key] == expected_seen[key] for key in expected_seen), seen
    spans = sum(len({i // ROW_EXAMPLES for i in range(s * ROW_GLOBAL, (s + 1) * ROW_GLOBAL)}) for s in range(ROW_STEPS))
    assert saved["row_exchanges"] == spans
