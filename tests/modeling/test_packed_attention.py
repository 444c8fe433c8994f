"""Packed rows through megatron's local layer spec: THD with the per-sequence core attention
gives each sequence what it gets alone (log-probs and gradients), with and without a sliding
window; the dense block-diagonal mask kept for benchmarks/step_cost.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_dft.modeling.packed_attention import block_causal_mask
from tests.conftest import torchrun


def test_mask_is_block_diagonal_causal_with_the_window_built_in():
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    allowed = ~block_causal_mask(segments, window=(1, 0))[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i, j in [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 4), (5, 5), (6, 5), (6, 6),
                 (7, 7)]:
        expected[i, j] = True
    assert torch.equal(allowed, expected)
    # one segment and no window: plain causal, as megatron's default mask
    causal = block_causal_mask(torch.zeros(1, 6, dtype=torch.long))[0, 0]
    assert torch.equal(causal, torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1))


@pytest.mark.slow
def test_packed_row_matches_separate_sequences_on_the_local_spec(tmp_path):
    seed = int(torch.randint(0, 2**31, ()).item())
    torchrun(Path(__file__).parent / "workers" / "packed_attention.py", [str(tmp_path / "out.pt"), str(seed)], 1)
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for case in ("no_window", "window"):
        r = results[case]
        torch.testing.assert_close(r["packed"], r["separate"], rtol=1e-5, atol=1e-5, msg=case)
        torch.testing.assert_close(r["packed_grads"], r["separate_grads"], rtol=1e-4, atol=1e-5, msg=case)


def test_thd_boundaries_cover_the_whole_row():
    """Transformer Engine's THD path: the row's tail padding is one more sequence, so every
    position lies inside a boundary; a row without padding keeps its boundaries."""
    from nemo_dft.data.packing import pack_groups
    from nemo_dft.data.tokenize import TokenizedPair
    from nemo_dft.modeling.packed_attention import thd_packed_seq_params

    items = [{"index": 0, "epoch": 0, "pairs": [TokenizedPair([1, 2], [3, 4, 5]), TokenizedPair([1, 2], [6])]}]
    row = pack_groups(items, pad_id=0, width=16)  # 4 + 2 real positions, 10 of padding
    params = thd_packed_seq_params(row["cu_seqlens"], row["tokens"].shape[-1])
    assert params.cu_seqlens_q.tolist() == [0, 4, 6, 16] and params.max_seqlen_q == 10
    exact = pack_groups(items, pad_id=0, width=6)
    assert thd_packed_seq_params(exact["cu_seqlens"], 6).cu_seqlens_q.tolist() == [0, 4, 6]
