"""The DFT / DFT2 objective in plain torch (Guo et al., ICML 2025).

Kept free of NeMo and Megatron so that it can be read beside the paper and reused by any
trainer.  Notation follows ``shared/reference/dft-algorithm.md``:

    d_ij   = s(y'_ij)/tau - s_ref(y'_ij)            (DFT, reference-based)
    d_ij   = s̄(y'_ij)/tau                            (DFT2, reference-free, length-averaged)
    w_i    = log(gamma) + logmeanexp_j d_ij
    u_i    = w_i                                     if gamma == 1
    u_i    = logaddexp(log(1 - gamma) + u_i_old, w_i) otherwise
    weight = stopgrad(exp(d_ij - u_i))               (uses the *updated* u_i)
    loss_i = -pos_i + mean_j(weight_ij * neg_ij)
    loss   = mean_i loss_i

The SFT baseline (``sft_loss``) is the token-mean negative log-likelihood of the positives:

    loss   = -sum_i s(y_i) / sum_i |y_i|             (|y_i|: response tokens of the positive)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LENGTH_EPS = 1e-8


@dataclass(frozen=True)
class DFTLossOutput:
    """What one evaluation of the objective produces for a batch of B examples."""

    loss: torch.Tensor
    """Scalar surrogate loss, mean over the batch; its gradient is the DFT gradient."""
    u: torch.Tensor
    """Updated per-example estimates u_i, detached, shape [B]."""
    weights: torch.Tensor
    """Negative weights exp(d_ij - u_i), detached, shape [B, m]."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Batch means for logging (floats)."""


def validate_hyperparameters(tau: float, gamma: float) -> None:
    """Raise ValueError unless tau > 0 and 0 < gamma <= 1."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"dft.tau must be a finite number > 0, got {tau!r}")
    if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"dft.gamma must lie in (0, 1], got {gamma!r}")


def log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``, shifted by the max so that it never overflows."""
    shift = x.max(dim=dim, keepdim=True).values.detach()
    return (x - shift).exp().mean(dim=dim).log() + shift.squeeze(dim)


def update_u(u_old: torch.Tensor, w: torch.Tensor, gamma: float) -> torch.Tensor:
    """Moving estimator in log space: u = log((1 - gamma) exp(u_old) + exp(w))."""
    if gamma == 1:
        return w
    return torch.logaddexp(math.log(1.0 - gamma) + u_old, w)


def length_average(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """s̄ = s / (number of response tokens + 1e-8), as in the reference trainer."""
    return logps / (lengths.to(logps.dtype) + LENGTH_EPS)


def ranking_accuracy(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Share of examples whose positive score is strictly above every negative's."""
    return (pos_scores.unsqueeze(-1) > neg_scores).all(dim=-1).float().mean()


def _check_shapes(
    pos_logps: torch.Tensor,
    neg_logps: torch.Tensor,
    u: torch.Tensor,
    ref_neg_logps: torch.Tensor | None,
    pos_lengths: torch.Tensor | None,
    neg_lengths: torch.Tensor | None,
) -> None:
    if pos_logps.dim() != 1:
        raise ValueError(f"pos_logps must have shape [B], got {tuple(pos_logps.shape)}")
    batch = pos_logps.shape[0]
    if neg_logps.dim() != 2 or neg_logps.shape[0] != batch or neg_logps.shape[1] < 1:
        raise ValueError(
            f"neg_logps must have shape [B={batch}, m>=1], got {tuple(neg_logps.shape)}"
        )
    if tuple(u.shape) != (batch,):
        raise ValueError(f"u must have shape [B={batch}], got {tuple(u.shape)}")
    expected = {
        "ref_neg_logps": (ref_neg_logps, tuple(neg_logps.shape)),
        "pos_lengths": (pos_lengths, (batch,)),
        "neg_lengths": (neg_lengths, tuple(neg_logps.shape)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(tensor.shape)}")
    if ref_neg_logps is None and (pos_lengths is None or neg_lengths is None):
        raise ValueError(
            "reference-free DFT2 (ref_neg_logps=None) needs pos_lengths and neg_lengths "
            "to length-average the scores"
        )


def dft_loss(
    pos_logps: torch.Tensor,
    neg_logps: torch.Tensor,
    u: torch.Tensor,
    *,
    tau: float,
    gamma: float,
    ref_neg_logps: torch.Tensor | None = None,
    pos_lengths: torch.Tensor | None = None,
    neg_lengths: torch.Tensor | None = None,
    with_metrics: bool = True,
) -> DFTLossOutput:
    """DFT (``ref_neg_logps`` given) or DFT2 (``ref_neg_logps=None``) loss for one batch.

    Args:
        pos_logps: [B] summed response log-probs of the positives under the policy.
        neg_logps: [B, m] summed response log-probs of the negatives under the policy.
        u: [B] the examples' current (pre-update) estimates.
        tau: temperature on the policy score of negatives (> 0).
        gamma: moving-average rate of u, in (0, 1].
        ref_neg_logps: [B, m] reference log-probs of the negatives; None selects DFT2.
        pos_lengths, neg_lengths: response token counts; required by DFT2, and used by
            DFT only for the length-averaged ranking-accuracy metric.
        with_metrics: False leaves ``metrics`` empty: they are Python floats, one device-to-host
            copy each, which a training step computing its own statistics does not need.

    Returns:
        DFTLossOutput with the loss, the updated u, the negative weights and metrics.
    """
    validate_hyperparameters(tau, gamma)
    _check_shapes(pos_logps, neg_logps, u, ref_neg_logps, pos_lengths, neg_lengths)
    compute_dtype = torch.promote_types(neg_logps.dtype, torch.float32)
    pos_logps = pos_logps.to(compute_dtype)
    neg_logps = neg_logps.to(compute_dtype)

    if ref_neg_logps is None:
        pos = length_average(pos_logps, pos_lengths)
        neg = length_average(neg_logps, neg_lengths)
        d = neg.detach() / tau
    else:
        pos, neg = pos_logps, neg_logps
        d = neg.detach() / tau - ref_neg_logps.to(compute_dtype)

    w = math.log(gamma) + log_mean_exp(d, dim=-1)
    u_new = update_u(u.to(compute_dtype), w, gamma).detach()
    weights = torch.exp(d - u_new.unsqueeze(-1)).detach()
    per_example = -pos + (weights * neg).mean(dim=-1)
    loss = per_example.mean()

    metrics = _metrics(pos_logps, neg_logps, u_new, weights, pos_lengths, neg_lengths) if with_metrics else {}
    return DFTLossOutput(loss=loss, u=u_new, weights=weights, metrics=metrics)


def _metrics(
    pos_logps: torch.Tensor,
    neg_logps: torch.Tensor,
    u_new: torch.Tensor,
    weights: torch.Tensor,
    pos_lengths: torch.Tensor | None,
    neg_lengths: torch.Tensor | None,
) -> dict[str, float]:
    with torch.no_grad():
        metrics = {
            "u_mean": u_new.mean().item(),
            "weight_mean": weights.mean().item(),
            "pos_logps": pos_logps.mean().item(),
            "neg_logps": neg_logps.mean().item(),
        }
        if pos_lengths is not None and neg_lengths is not None:
            metrics["rank_acc"] = ranking_accuracy(
                length_average(pos_logps, pos_lengths), length_average(neg_logps, neg_lengths)
            ).item()
    return metrics


@dataclass(frozen=True)
class SFTLossOutput:
    """The SFT baseline for a batch: the token mean, and its numerator and denominator, which a
    trainer sums over micro-batches and ranks to take the mean over a whole global batch."""

    loss: torch.Tensor
    """Scalar: negative log-likelihood per positive response token."""
    nll_sum: torch.Tensor
    """Scalar: summed negative log-likelihood of the positives (carries the gradient)."""
    tokens: torch.Tensor
    """Scalar: number of positive response tokens."""


def sft_loss(pos_logps: torch.Tensor, pos_lengths: torch.Tensor) -> SFTLossOutput:
    """Token-mean NLL of the positives, -sum_i s(y_i) / sum_i |y_i|: every response token of the
    batch weighs the same, whatever answer it belongs to (the SFT baseline; negatives unused).

    Args:
        pos_logps: [B] summed response log-probs of the positives under the policy.
        pos_lengths: [B] their response token counts.
    """
    if pos_logps.dim() != 1 or tuple(pos_lengths.shape) != tuple(pos_logps.shape):
        raise ValueError(f"pos_logps and pos_lengths must both have shape [B], got "
                         f"{tuple(pos_logps.shape)} and {tuple(pos_lengths.shape)}")
    nll_sum = -pos_logps.to(torch.promote_types(pos_logps.dtype, torch.float32)).sum()
    tokens = pos_lengths.sum()
    return SFTLossOutput(loss=nll_sum / tokens.clamp(min=1).to(nll_sum.dtype), nll_sum=nll_sum, tokens=tokens)
