"""Final-answer extraction and comparison for generation accuracy.

``answer_is``: the text after the last "The answer is" (the MetaMath / GSM8K convention of the
paper's math evaluation; a reference may also end GSM8K-style with "#### N"); where the reference's
answer is a number, the first number of the prediction's answer is compared to it numerically (as
MetaMath's GSM8K scorer does), else the texts (case-insensitive); ``exact``: the whole answer,
whitespace-normalized; ``number``: the first number after the marker, else the last number of
the text, on each side.
"""

from __future__ import annotations

import math
import re

EXTRACTIONS = ("answer_is", "exact", "number")
ANSWER_IS = re.compile(r"the answer is\s*:?", re.IGNORECASE)
GSM8K_MARK = "####"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def normalize_text(text: str) -> str:
    """Collapse whitespace and drop a trailing period."""
    return " ".join(text.split()).rstrip(".").strip()


def after_answer_marker(text: str) -> str | None:
    """The first line after the last "The answer is[:]" (or GSM8K's "####"), or None without one."""
    matches = list(ANSWER_IS.finditer(text))
    if matches:
        rest = text[matches[-1].end():]
    elif GSM8K_MARK in text:
        rest = text.rsplit(GSM8K_MARK, 1)[1]
    else:
        return None
    return rest.strip().split("\n", 1)[0].strip()


def parse_number(text: str, first: bool = False) -> float | None:
    """The last (or first) number in ``text`` (commas and $ ignored; a/b as a fraction), or None."""
    found = NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    token = found[0 if first else -1].replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(token)
    except ValueError:
        return None


def extract(text: str, mode: str) -> str | None:
    """The answer ``mode`` reads from ``text`` (None: there is none)."""
    if mode == "exact":
        return normalize_text(text)
    if mode == "answer_is":
        found = after_answer_marker(text)
        return None if found is None else normalize_text(found)
    if mode == "number":
        marked = after_answer_marker(text)
        value = parse_number(marked, first=True) if marked is not None else None
        value = parse_number(text) if value is None else value
        return None if value is None else repr(value)
    raise ValueError(f"extract: unknown extraction {mode!r}; choose one of {', '.join(EXTRACTIONS)}")


def reference_answer(reference: str, mode: str) -> str | None:
    """The reference's answer under ``mode``; a reference without the marker is taken whole."""
    found = extract(reference, mode)
    if found is None and mode == "answer_is":
        return normalize_text(reference)
    return found


def _same(predicted: str, expected: str) -> bool:
    """A numeric reference against the prediction's first number, else the texts."""
    if NUMBER.fullmatch(expected.replace("$", "").strip()):
        x, y = parse_number(predicted, first=True), parse_number(expected)
        return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return predicted.casefold() == expected.casefold()


def is_correct(prediction: str, reference: str, mode: str) -> bool:
    """Whether the generated ``prediction`` gives the ``reference``'s answer under ``mode``."""
    predicted = extract(prediction, mode)
    expected = reference_answer(reference, mode)
    if predicted is None or expected is None:
        return False
    if mode == "exact":
        return predicted == expected
    if mode == "number":
        return math.isclose(float(predicted), float(expected), rel_tol=1e-6, abs_tol=1e-9)
    return _same(predicted, expected)
