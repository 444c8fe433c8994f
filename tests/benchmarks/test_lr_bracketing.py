"""benchmarks/dft_vs_sft.py's learning-rate choice: a best rate at an edge of the grid extends the
grid past that edge until it is inside (on a stub scorer)."""

from __future__ import annotations

import math

import pytest

from benchmarks.dft_vs_sft import bracketed_choice, neighbour_rate

GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def peaked_at(optimum: float):
    calls: list[float] = []

    def score(lr: float) -> float:
        calls.append(lr)
        return 1.0 - abs(math.log10(lr) - math.log10(optimum)) / 10

    return score, calls


@pytest.mark.parametrize(("lr", "up", "down"), [(1e-4, 3e-4, 3e-5), (3e-4, 1e-3, 1e-4), (1e-3, 3e-3, 3e-4),
                                                (3e-3, 1e-2, 1e-3), (1e-5, 3e-5, 3e-6)])
def test_half_decade_neighbours(lr, up, down) -> None:
    assert neighbour_rate(lr, 1) == pytest.approx(up)
    assert neighbour_rate(lr, -1) == pytest.approx(down)


def test_an_interior_best_is_chosen_without_extending() -> None:
    score, calls = peaked_at(3e-4)
    best, scores, extensions = bracketed_choice(score, GRID, 2)
    assert best == 3e-4 and extensions == [] and sorted(calls) == sorted(GRID)


@pytest.mark.parametrize(("optimum", "added"), [(1e-2, [1e-2, 3e-2]), (1e-5, [1e-5, 3e-6])])
def test_a_best_at_an_edge_extends_the_grid_until_it_is_inside(optimum, added) -> None:
    score, calls = peaked_at(optimum)
    best, scores, extensions = bracketed_choice(score, GRID, 3)
    assert calls[len(GRID):] == pytest.approx(added)
    assert best == pytest.approx(optimum)
    rates = sorted(scores)
    assert rates[0] < best < rates[-1]
    assert len(extensions) == 2


def test_extension_stops_at_the_cap_and_reports_the_edge() -> None:
    score, calls = peaked_at(1.0)
    best, scores, extensions = bracketed_choice(score, GRID, 2)
    assert len(calls) == len(GRID) + 2 and best == max(scores) == pytest.approx(3e-2)
    assert len(extensions) == 2


def test_a_tie_goes_to_the_smaller_rate_and_missing_scores_count_as_zero() -> None:
    values = {3e-5: None, 1e-4: 0.5, 3e-4: 0.5, 1e-3: 0.2, 3e-3: None}
    best, _, extensions = bracketed_choice(lambda lr: values[lr], GRID, 2)
    assert best == 1e-4 and extensions == []


def test_a_single_rate_without_extensions_is_taken_unscored() -> None:
    score, calls = peaked_at(1e-3)
    best, scores, extensions = bracketed_choice(score, (3e-3,), 0)
    assert (best, scores, extensions, calls) == (3e-3, {3e-3: None}, [], [])
    best, _, _ = bracketed_choice(score, (3e-3,), 1)  # one rate is an edge: with extensions allowed, it grows
    assert calls == [3e-3, 1e-3] and best == 1e-3
