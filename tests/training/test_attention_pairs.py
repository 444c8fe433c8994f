"""The attention pairs the FLOPs count (throughput.py) takes from each micro-batch: a padded
layout computes rows x width^2, a packed row (THD, attention per sequence) the sum of its
sequences' squared lengths, not its width squared."""

from __future__ import annotations

import torch

from nemo_dft.data.collate import collate_groups
from nemo_dft.data.packing import pack_groups
from nemo_dft.data.tokenize import TokenizedPair
from nemo_dft.training.loss_reduction import STAT_NAMES, DFTHyperParameters, DFTLossReduction


def stats(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    reduction = DFTLossReduction(DFTHyperParameters(tau=1.0, gamma=0.85, num_negatives=2, ref_free=True), None,
                                 evaluation=True)
    _, _, extra = reduction.forward(batch, -torch.rand(batch["loss_mask"].shape))
    return dict(zip(STAT_NAMES, extra["stats"].tolist(), strict=True))


def test_packed_rows_count_each_sequences_attention_pairs():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def pair() -> TokenizedPair:
        prompt = torch.randint(1, 50, (int(torch.randint(2, 9, (), generator=generator)),), generator=generator)
        response = torch.randint(1, 50, (int(torch.randint(1, 12, (), generator=generator)),), generator=generator)
        return TokenizedPair(prompt.tolist(), response.tolist())

    items = [{"index": g, "epoch": 0, "pairs": [pair() for _ in range(3)]} for g in range(2)]
    inputs = [len(p.prompt) + len(p.response) - 1 for item in items for p in item["pairs"]]
    padded = collate_groups(items, pad_id=0)
    rows, width = padded["loss_mask"].shape
    assert stats(padded)["padded_token_pairs"] == rows * width * width
    packed = pack_groups(items, pad_id=0, width=sum(inputs) + 5)  # tail padding: computed, never attended
    counted = stats(packed)
    assert counted["padded_token_pairs"] == sum(n * n for n in inputs)
    assert counted["padded_tokens"] == sum(inputs) + 5
