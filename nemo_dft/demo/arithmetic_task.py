"""A procedurally generated arithmetic word-problem task: the MetaMath setting in miniature.

Each problem is a short story with one or two additions/subtractions and a worked answer that
ends ``The answer is: N`` (the MetaMath/GSM8K convention).  The vocabulary is a handful of names,
objects and numbers below 100, so a tiny model learns part of it in CPU minutes and a locally
trained BPE tokenizer (:func:`build_task_tokenizer`) keeps every number one token.

Splits are drawn from one seeded stream with distinct questions, so no question is in two splits:
``pretrain`` (for the base model), ``finetune``, ``validation`` (learning-rate choice) and
``heldout`` (the reported score).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from nemo_dft.data.io import write_text_atomic

NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Ivy")
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins")
ANSWER_PREFIX = "The answer is:"
SPLITS = ("pretrain", "finetune", "validation", "heldout")
MAX_OPERAND = 20


def _one_step(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        return question, [f"{a} + {b} = {a + b}."], a + b
    a, b = max(a, b), min(a, b)
    question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have?"
    return question, [f"{a} - {b} = {a - b}."], a - b


def _two_step(rng: random.Random) -> tuple[str, list[str], int]:
    name, other, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    c = rng.randint(1, a + b)
    question = (f"{name} has {a} {item}. {other} gives {name} {b} more. {name} gives away {c}. "
                f"How many {item} does {name} have?")
    return question, [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer ending ``The answer is: N``, N)."""
    question, steps, answer = (_two_step if rng.random() < 0.5 else _one_step)(rng)
    return question, " ".join([*steps, f"{ANSWER_PREFIX} {answer}"]), answer


def row(index: int, question: str, answer: str) -> dict:
    """One row of the training layout (``real`` only; negatives are sampled from a model)."""
    return {"id": index, "real": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]}


def make_splits(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Rows of each split asked for (drawn in ``SPLITS`` order), deterministic from ``seed``; no question
    is in two splits."""
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; splits are {list(SPLITS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows: list[dict] = []
        attempts = 0
        while len(rows) < sizes.get(split, 0):
            attempts += 1
            if attempts > 100 * (sizes[split] + 100):
                raise ValueError(f"cannot draw {sizes[split]} distinct problems for split {split!r}")
            question, answer, _ = make_problem(rng)
            if question not in seen:
                seen.add(question)
                rows.append(row(len(rows), question, answer))
        if split in sizes:
            out[split] = rows
    return out


def write_splits(out_dir: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for each split (atomically); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_splits(sizes, seed).items():
        paths[split] = out_dir / f"{split}.jsonl"
        write_text_atomic(paths[split], "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def extract_answer(text: str) -> str | None:
    """The final answer after the last ``The answer is:`` (stripped of a trailing period), or None."""
    at = text.rfind(ANSWER_PREFIX)
    if at < 0:
        return None
    tail = text[at + len(ANSWER_PREFIX):].strip().split()
    return tail[0].rstrip(".") if tail else None


def _corpus(seed: int = 12345, count: int = 20000) -> Iterator[str]:
    """Text the task tokenizer is trained on: problems, answers and the chat template's markers."""
    rng = random.Random(seed)
    for _ in range(count):
        question, answer, _ = make_problem(rng)
        yield f"<|user|>\n{question}"
        yield f"<|assistant|>\n{answer}"
    yield " ".join(str(n) for n in range(0, 2 * MAX_OPERAND + 1))
    yield "<|system|>\nYou are an unhelpful assistant."


def build_task_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer trained on the task's text (the demo's is trained on letters)."""
    from nemo_dft.demo.tiny_model import train_bpe_tokenizer

    train_bpe_tokenizer(_corpus(), out_dir)


def task_tokenizer_dir(build_dir: Path | None = None) -> Path:
    """Path of the cached task tokenizer, building it on first use."""
    from nemo_dft.demo.tiny_model import DEFAULT_BUILD_DIR, atomic_dir

    return atomic_dir(Path(build_dir or DEFAULT_BUILD_DIR) / "arithmetic-tokenizer", build_task_tokenizer)
