"""Verifier-filtered negatives: drop samples whose final answer equals the reference's.

Beyond the paper (which keeps every sample).  Pushing down a correct sample also pushes down the
positive it resembles, so where a task's answers can be checked (math, code) a user may keep only
incorrect negatives.  Correctness is judged by the extractors of ``scripts/evaluate.py``
(:mod:`nemo_dft.evaluation.extraction`).

Sampling runs in rounds: round 0 draws ``sampling.n`` samples per prompt; a prompt with fewer
than ``n`` incorrect samples draws ``n`` more with the next round's seed, up to
``sampling.max_resample_rounds`` extra rounds.  A prompt keeps its first ``n`` incorrect samples
in seed order (round, then slot).  A prompt still short after the last round follows
``filter.on_short``: ``drop`` leaves it out of the output (its id is listed in the shard's
metadata), ``keep`` fills its slots with its correct samples in seed order.  Everything is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_dft.evaluation.extraction import is_correct

SHORT_POLICIES = ("drop", "keep")


@dataclass
class PromptPool:
    """One prompt's samples so far, split by the verifier, each list in seed order."""

    incorrect: list[str] = field(default_factory=list)
    correct: list[str] = field(default_factory=list)

    def short(self, n: int) -> bool:
        return len(self.incorrect) < n


def add_sample(pool: PromptPool, text: str, reference: str, extract: str) -> bool:
    """File ``text`` under correct or incorrect; returns whether it is correct."""
    correct = is_correct(text, reference, extract)
    (pool.correct if correct else pool.incorrect).append(text)
    return correct


def select(pool: PromptPool, n: int, on_short: str) -> list[str] | None:
    """The ``n`` negatives a prompt keeps, or None when it is dropped (short under ``drop``)."""
    if not pool.short(n):
        return pool.incorrect[:n]
    if on_short == "drop":
        return None
    filled = pool.incorrect + pool.correct
    return filled[:n] if len(filled) >= n else None
