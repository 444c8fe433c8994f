"""The frozen reference scores the negative rows only, and the loss gets the same reference values
as when every row was scored (the positives' reference scores never entered the loss)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import nemo_dft.training.model as model_module
from nemo_dft.data.collate import collate_groups
from nemo_dft.data.tokenize import TokenizedPair
from nemo_dft.modeling.logprobs import sequence_logps, split_groups
from nemo_dft.training.loss_reduction import DFTHyperParameters, DFTLossReduction
from nemo_dft.training.u_table import UTable

VOCAB = 50


def plain_token_logps(logits: torch.Tensor, labels: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()


class CountingReference(torch.nn.Module):
    """A deterministic per-token 'model' that records every row it is asked to score."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, VOCAB)
        self.seen: list[torch.Tensor] = []

    def forward(self, tokens, position_ids, attention_mask=None):
        self.seen.append(tokens.clone())
        return self.embed(tokens) + 0.01 * position_ids.unsqueeze(-1)


def random_batch(groups: int, m: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def pair() -> TokenizedPair:
        prompt = torch.randint(1, VOCAB, (int(torch.randint(2, 6, (), generator=generator)),), generator=generator)
        response = torch.randint(1, VOCAB, (int(torch.randint(1, 7, (), generator=generator)),), generator=generator)
        return TokenizedPair(prompt.tolist(), response.tolist())

    items = [{"index": g, "epoch": 0, "pairs": [pair() for _ in range(1 + m)]} for g in range(groups)]
    return collate_groups(items, pad_id=0)


def test_frozen_reference_sees_only_the_negative_rows(monkeypatch):
    monkeypatch.setattr(model_module, "token_logps", plain_token_logps)
    generator = torch.Generator().manual_seed(7)
    m, groups = 3, 4
    hparams = DFTHyperParameters(tau=1.0, gamma=0.85, num_negatives=m, ref_free=False)
    batch = random_batch(groups, m, generator)
    reference = CountingReference()
    model = SimpleNamespace(reference_module=lambda: reference, dft=hparams)

    batch["ref_neg_token_logps"] = model_module.DFTModel.reference_token_logps(model, batch)

    [seen] = reference.seen
    assert seen.shape[0] == groups * m  # B * m rows, not B * (1 + m)
    negatives = torch.tensor([r for r in range(groups * (1 + m)) if r % (1 + m) != 0])
    assert torch.equal(seen, batch["tokens"][negatives])

    # independent: score every row, keep the negatives' sums
    with torch.no_grad():
        every_row = plain_token_logps(reference(batch["tokens"], batch["position_ids"]), batch["labels"])
    expected_neg = split_groups(sequence_logps(every_row, batch["loss_mask"])[0], 1 + m)[1]
    reduction = DFTLossReduction(hparams, UTable(groups))
    assert torch.allclose(reduction.negative_scores(batch, batch["ref_neg_token_logps"]), expected_neg, atol=1e-6)

    # the loss uses exactly those values
    policy = torch.randn(batch["tokens"].shape, generator=generator)
    loss, _, _ = reduction.forward(batch, policy)
    check = DFTLossReduction(hparams, UTable(groups))
    offline = dict(batch, ref_neg_logps=expected_neg)
    del offline["ref_neg_token_logps"]
    loss_offline, _, _ = check.forward(offline, policy)
    assert torch.allclose(loss, loss_offline, rtol=1e-6)
    assert torch.equal(reduction.u_table.values, check.u_table.values)
