"""The NaN guard's gradient check (nemo_dft.training.nonfinite.gradients_finite) against the
elementwise isfinite of every gradient: NaN or inf anywhere, in any dtype, is found; huge finite
gradients whose squares overflow the fused norm are not mistaken for non-finite ones."""

from __future__ import annotations

import pytest
import torch

from nemo_dft.training.nonfinite import gradients_finite


def elementwise(grads: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


def fresh_grads(generator: torch.Generator) -> list[torch.Tensor]:
    shapes = [(64, 32), (32,), (7, 5, 3), (1,), (128,)]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    grads.append(torch.randn(40, generator=generator).to(torch.bfloat16))  # mixed dtypes, as main_grad may be
    return grads


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -3e38, None])
def test_agrees_with_the_elementwise_check(bad):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    for trial in range(20):
        grads = fresh_grads(generator)
        if bad is not None:
            which = int(torch.randint(len(grads), (1,), generator=generator))
            flat = grads[which].view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=generator))] = bad
        assert gradients_finite(grads) == elementwise(grads), (bad, trial)
    assert gradients_finite(grads) == (bad is None or abs(bad) < float("inf") and bad == bad)


def test_huge_finite_gradients_are_finite():
    grads = [torch.full((1000,), 3e38), torch.full((10,), 1e20)]  # the squares' sum is inf in fp32
    assert not torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0))
    assert gradients_finite(grads)


def test_no_gradients_is_finite():
    assert gradients_finite([])
