"""Sequence log-probs: TP=2 on 2 CPU processes equals TP=1 and a plain log_softmax/gather."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    batch, seq, vocab = 6, 11, 64
    inputs = {
        "logits": torch.randn(batch, seq, vocab) * 3,
        "labels": torch.randint(0, vocab, (batch, seq)),
        "mask": (torch.rand(batch, seq) > 0.4).float(),
        "upstream": torch.randn(batch),
    }
    torch.save(inputs, tmp / "inputs.pt")
    torchrun(Path(__file__).parent / "workers" / "tp_logprobs.py", [str(tmp / "inputs.pt"), str(tmp / "out.pt")], 2)
    return inputs, torch.load(tmp / "out.pt", weights_only=True)


def plain_reference(inputs):
    logits = inputs["logits"].clone().double().requires_grad_()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, inputs["labels"].unsqueeze(-1)).squeeze(-1)
    sums = (logp * inputs["mask"]).sum(-1)
    (sums * inputs["upstream"]).sum().backward()
    return sums.detach(), inputs["mask"].sum(-1), logits.grad


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_values_and_gradients_match_plain_torch(tp_results, layout):
    inputs, results = tp_results
    sums, lengths, grad = plain_reference(inputs)
    ours = results[layout]
    torch.testing.assert_close(ours["sums"].double(), sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours["lengths"], lengths)
    torch.testing.assert_close(ours["grad"].double(), grad, rtol=1e-5, atol=1e-6)


def test_tp2_equals_tp1(tp_results):
    _, results = tp_results
    torch.testing.assert_close(results["tp2"]["sums"], results["tp1"]["sums"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results["tp2"]["grad"], results["tp1"]["grad"], rtol=1e-6, atol=1e-7)


def test_groups_split_into_positive_and_negatives():
    from nemo_dft.modeling.logprobs import sequence_logps, split_groups

    token_logp = torch.randn(6, 5)
    mask = torch.ones(6, 5)
    sums, lengths = sequence_logps(token_logp, mask)
    pos, neg = split_groups(sums, 3)
    torch.testing.assert_close(pos, sums[[0, 3]])
    torch.testing.assert_close(neg, sums.view(2, 3)[:, 1:])
