"""The DFT objective against an independent, loop-based float64 computation of the spec."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_dft.objective import dft_loss, log_mean_exp


def spec_reference(pos, neg, u_old, tau, gamma, ref_neg=None, pos_len=None, neg_len=None):
    """dft-algorithm.md written out example by example in float64 (no shared helpers)."""
    batch, m = neg.shape
    losses, new_u, weights = [], [], torch.zeros(batch, m, dtype=torch.float64)
    for i in range(batch):
        if ref_neg is None:
            pos_i = pos[i] / (pos_len[i] + 1e-8)
            negs = [neg[i, j] / (neg_len[i, j] + 1e-8) for j in range(m)]
            d = [negs[j].detach() / tau for j in range(m)]
        else:
            pos_i = pos[i]
            negs = [neg[i, j] for j in range(m)]
            d = [neg[i, j].detach() / tau - ref_neg[i, j] for j in range(m)]
        d_t = torch.stack(d)
        w = math.log(gamma) + torch.logsumexp(d_t, dim=0) - math.log(m)
        if gamma == 1:
            u = w
        else:
            u = torch.logsumexp(torch.stack([math.log(1 - gamma) + u_old[i], w]), dim=0)
        new_u.append(u)
        term = 0.0
        for j in range(m):
            weight = torch.exp(d_t[j] - u).detach()
            weights[i, j] = weight
            term = term + weight * negs[j]
        losses.append(-pos_i + term / m)
    return torch.stack(losses).mean(), torch.stack(new_u), weights


def random_inputs(batch, m, scale=30.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    pos = -torch.rand(batch, generator=gen, dtype=torch.float64) * scale
    neg = -torch.rand(batch, m, generator=gen, dtype=torch.float64) * scale
    ref = neg + torch.randn(batch, m, generator=gen, dtype=torch.float64)
    u = torch.randn(batch, generator=gen, dtype=torch.float64)
    pos_len = torch.randint(1, 40, (batch,), generator=gen).double()
    neg_len = torch.randint(1, 40, (batch, m), generator=gen).double()
    return pos, neg, ref, u, pos_len, neg_len


def _compare(pos, neg, ref, u, pos_len, neg_len, tau, gamma, ref_free):
    pos_a, neg_a = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    pos_b, neg_b = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    ours = dft_loss(
        pos_a, neg_a, u, tau=tau, gamma=gamma, ref_neg_logps=None if ref_free else ref,
        pos_lengths=pos_len, neg_lengths=neg_len,
    )
    loss, new_u, weights = spec_reference(
        pos_b, neg_b, u, tau, gamma, None if ref_free else ref, pos_len, neg_len
    )
    ours.loss.backward()
    loss.backward()
    torch.testing.assert_close(ours.loss, loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.u, new_u.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.weights, weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pos_a.grad, pos_b.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(neg_a.grad, neg_b.grad, rtol=1e-10, atol=1e-12)
    return ours, pos_a.grad, neg_a.grad


@pytest.mark.parametrize("ref_free", [False, True], ids=["DFT", "DFT2"])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("gamma", [0.85, 1.0])
def test_matches_spec_loss_u_weights_and_gradients(ref_free, m, gamma):
    pos, neg, ref, u, pos_len, neg_len = random_inputs(batch=5, m=m)
    tau = 0.3 if ref_free else 1.0
    _compare(pos, neg, ref, u, pos_len, neg_len, tau, gamma, ref_free)


def test_gradient_has_the_documented_closed_form():
    pos, neg, ref, u, pos_len, neg_len = random_inputs(batch=3, m=2)
    ours, pos_grad, neg_grad = _compare(pos, neg, ref, u, pos_len, neg_len, 0.7, 0.9, ref_free=False)
    batch, m = neg.shape
    torch.testing.assert_close(pos_grad, torch.full_like(pos, -1 / batch))
    torch.testing.assert_close(neg_grad, ours.weights / (m * batch))


@pytest.mark.parametrize("ref_free", [False, True], ids=["DFT", "DFT2"])
def test_extreme_log_probs_stay_finite(ref_free):
    pos, neg, ref, u, pos_len, neg_len = random_inputs(batch=4, m=3, scale=1.0)
    neg = neg - 2000.0
    ref = ref - 2000.0
    pos = pos - 2000.0
    for dtype in (torch.float64, torch.float32):
        result = dft_loss(
            pos.to(dtype).requires_grad_(), neg.to(dtype).requires_grad_(), u.to(dtype), tau=0.05, gamma=0.9,
            ref_neg_logps=None if ref_free else ref.to(dtype), pos_lengths=pos_len, neg_lengths=neg_len,
        )
        assert torch.isfinite(result.loss) and torch.isfinite(result.u).all() and torch.isfinite(result.weights).all()
    _compare(pos, neg, ref, u, pos_len, neg_len, 0.05, 0.9, ref_free)


def test_weights_use_the_updated_u():
    pos, neg, ref, u, _, _ = random_inputs(batch=2, m=2)
    result = dft_loss(pos, neg, u, tau=1.0, gamma=0.5, ref_neg_logps=ref)
    d = neg / 1.0 - ref
    torch.testing.assert_close(result.weights, torch.exp(d - result.u.unsqueeze(-1)))
    assert not torch.allclose(result.weights, torch.exp(d - u.unsqueeze(-1)))


def test_log_mean_exp_does_not_overflow():
    x = torch.tensor([[1000.0, 1000.0], [-1000.0, -1001.0]])
    expected = torch.logsumexp(x, dim=-1) - math.log(2)
    torch.testing.assert_close(log_mean_exp(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0, "gamma": 0.9}, "tau"),
        ({"tau": -1.0, "gamma": 0.9}, "tau"),
        ({"tau": 1.0, "gamma": 0.0}, "gamma"),
        ({"tau": 1.0, "gamma": 1.5}, "gamma"),
    ],
)
def test_rejects_invalid_hyperparameters(kwargs, message):
    pos, neg, ref, u, _, _ = random_inputs(batch=2, m=2, seed=0)
    with pytest.raises(ValueError, match=message):
        dft_loss(pos, neg, u, ref_neg_logps=ref, **kwargs)


def test_rejects_disagreeing_shapes():
    pos, neg, ref, u, pos_len, neg_len = random_inputs(batch=3, m=2, seed=0)
    with pytest.raises(ValueError, match="neg_logps"):
        dft_loss(pos, neg[:2], u, tau=1.0, gamma=0.9, ref_neg_logps=ref)
    with pytest.raises(ValueError, match="ref_neg_logps"):
        dft_loss(pos, neg, u, tau=1.0, gamma=0.9, ref_neg_logps=ref[:, :1])
    with pytest.raises(ValueError, match="u must"):
        dft_loss(pos, neg, u[:2], tau=1.0, gamma=0.9, ref_neg_logps=ref)
    with pytest.raises(ValueError, match="pos_lengths and neg_lengths"):
        dft_loss(pos, neg, u, tau=1.0, gamma=0.9)
    with pytest.raises(ValueError, match="neg_lengths"):
        dft_loss(pos, neg, u, tau=1.0, gamma=0.9, pos_lengths=pos_len, neg_lengths=neg_len[:, :1])


# ---- the SFT baseline ---------------------------------------------------------------------------
def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_sft_loss_and_gradient_match_token_mean_cross_entropy():
    """sft_loss on summed sequence log-probs = torch's cross-entropy averaged over every response
    token of the batch (an independent computation), in value and in gradient."""
    from nemo_dft.objective import sft_loss

    torch.manual_seed(7)
    batch, width, vocab = 5, 9, 13
    logits = torch.randn(batch, width, vocab, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(vocab, (batch, width))
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for i, (start, end) in enumerate([(2, 9), (5, 6), (1, 4), (3, 9), (0, 2)]):  # unequal lengths
        mask[i, start:end] = True
    token = _token_logps(logits, labels) * mask
    ours = sft_loss(token.sum(-1), mask.sum(-1))
    (grad,) = torch.autograd.grad(ours.loss, logits)

    logits_ref = logits.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(logits_ref[mask], labels[mask], reduction="mean")
    expected.backward()
    torch.testing.assert_close(ours.loss, expected)
    torch.testing.assert_close(grad, logits_ref.grad)
    assert int(ours.tokens) == int(mask.sum())
    torch.testing.assert_close(ours.nll_sum, expected * mask.sum())


def test_sft_micro_batches_sum_to_the_global_token_mean():
    """What the trainer relies on: summing nll_sum and tokens over micro-batches gives the loss of
    the whole batch; the mean of per-micro-batch means does not (unequal token counts)."""
    from nemo_dft.objective import sft_loss

    torch.manual_seed(3)
    pos = -torch.rand(8, dtype=torch.float64) * 20
    lengths = torch.tensor([3, 17, 5, 2, 9, 30, 4, 1])
    whole = sft_loss(pos, lengths).loss
    parts = [sft_loss(pos[i:i + 2], lengths[i:i + 2]) for i in range(0, 8, 2)]
    summed = sum(p.nll_sum for p in parts) / sum(p.tokens for p in parts)
    torch.testing.assert_close(summed, whole)
    naive = torch.stack([p.loss for p in parts]).mean()
    assert not torch.isclose(naive, whole, rtol=1e-3)
