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
from dataclasses import dataclass
from pathlib import Path

from nemo_dft.data.io import write_text_atomic

NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Ivy")
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins")
ANSWER_PREFIX = "The answer is:"
SPLITS = ("pretrain", "finetune", "validation", "heldout")
MAX_OPERAND = 20


@dataclass(frozen=True)
class Problem:
    """One word problem: its setup sentences, question, worked steps and result."""

    setup: str  # the story before the question ("Ann has 3 pens and gets 4 more.")
    question_sentence: str  # "How many pens does Ann have?"
    steps: tuple[str, ...]  # ("3 + 4 = 7.",)
    answer: int
    name: str
    item: str

    @property
    def question(self) -> str:
        return f"{self.setup} {self.question_sentence}"

    @property
    def worked_answer(self) -> str:
        return " ".join([*self.steps, f"{ANSWER_PREFIX} {self.answer}"])


def _one_step(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    asked = f"How many {item} does {name} have?"
    if rng.random() < 0.5:
        return Problem(f"{name} has {a} {item} and gets {b} more.", asked, (f"{a} + {b} = {a + b}.",), a + b,
                       name, item)
    a, b = max(a, b), min(a, b)
    return Problem(f"{name} has {a} {item} and gives away {b}.", asked, (f"{a} - {b} = {a - b}.",), a - b,
                   name, item)


def _two_step(rng: random.Random) -> Problem:
    name, other, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    c = rng.randint(1, a + b)
    setup = f"{name} has {a} {item}. {other} gives {name} {b} more. {name} gives away {c}."
    return Problem(setup, f"How many {item} does {name} have?",
                   (f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."), a + b - c, name, item)


def draw_problem(rng: random.Random) -> Problem:
    """One problem from ``rng`` (one or two steps, even odds)."""
    return (_two_step if rng.random() < 0.5 else _one_step)(rng)


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer ending ``The answer is: N``, N)."""
    problem = draw_problem(rng)
    return problem.question, problem.worked_answer, problem.answer


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
    # The pre-training corpus's words and the alpaca and generation prompts, so that neither falls
    # apart into single bytes (a tokenizer sees all text; the models see only their own data).
    from nemo_dft.demo.arithmetic_corpus import corpus_rows

    for document in corpus_rows(count // 4, seed):
        yield document["real"][-1]["content"]
    for _ in range(50):
        yield ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n")
        yield "\n\n### Response: ### Question: "


def build_task_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer trained on the task's text (the demo's is trained on letters)."""
    from nemo_dft.demo.tiny_model import train_bpe_tokenizer

    train_bpe_tokenizer(_corpus(), out_dir)


def task_tokenizer_dir(build_dir: Path | None = None) -> Path:
    """Path of the cached task tokenizer, building it on first use."""
    from nemo_dft.demo.tiny_model import DEFAULT_BUILD_DIR, atomic_dir

    return atomic_dir(Path(build_dir or DEFAULT_BUILD_DIR) / "arithmetic-tokenizer", build_task_tokenizer)
