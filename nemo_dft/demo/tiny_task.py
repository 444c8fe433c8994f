"""The embedded demo task: spell a short word back.

Each example has one correct answer and K plausible wrong ones (the answer with a letter that
the question does not contain, replaced, inserted or appended), written in the 1-to-m
reference layout (``real``, ``generated_0..K-1``).  The task trains on a 2-core CPU in minutes,
and a model only ranks held-out answers correctly once it has learnt to answer from the
letters of the question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_task"
NUM_NEGATIVES = 8


def _spell(letters: list[str]) -> str:
    return " ".join(letters)


def _foreign(letters: list[str], rng: random.Random) -> str:
    return rng.choice([c for c in ALPHABET if c not in letters])


def _corruption(answer: list[str], rng: random.Random) -> list[str]:
    """The answer with a letter that the question does not contain: replaced, inserted or appended."""
    kind = rng.randrange(4)
    i = rng.randrange(len(answer))
    if kind == 0:
        return answer[:i] + [_foreign(answer, rng)] + answer[i + 1 :]
    if kind == 1:
        return answer[:i] + [_foreign(answer, rng)] + answer[i:]
    if kind == 2:
        j = rng.randrange(len(answer))
        wrong = answer[:i] + [_foreign(answer, rng)] + answer[i + 1 :]
        return wrong[:j] + [_foreign(answer, rng)] + wrong[j + 1 :]
    return answer + [_foreign(answer, rng)]


def _corruptions(answer: list[str], rng: random.Random, count: int) -> list[list[str]]:
    """``count`` distinct plausible wrong answers, each with a letter foreign to the question."""
    unique: list[list[str]] = []
    while len(unique) < count:
        candidate = _corruption(answer, rng)
        if candidate != answer and candidate not in unique:
            unique.append(candidate)
    return unique


def make_example(index: int, rng: random.Random) -> dict:
    """One row of the reference layout, with ``id`` = ``index``."""
    while True:
        letters = [rng.choice(ALPHABET) for _ in range(rng.randint(3, 6))]
        if len(set(letters)) == len(letters):
            break
    answer = letters
    negatives = _corruptions(answer, rng, NUM_NEGATIVES)
    question = f"Repeat: {_spell(letters)}"

    def chat(reply: list[str]) -> list[dict]:
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": _spell(reply)},
        ]

    row = {"id": index, "real": chat(answer)}
    for k, negative in enumerate(negatives):
        row[f"generated_{k}"] = chat(negative)
    return row


def write_task(out_dir: Path, num_train: int = 512, num_heldout: int = 128, seed: int = 0) -> None:
    """Write ``train.jsonl`` and ``heldout.jsonl`` deterministically from ``seed``."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < num_train + num_heldout:
        row = make_example(len(rows), rng)
        question = row["real"][0]["content"]
        if question not in seen:
            seen.add(question)
            rows.append(row)
    splits = {"train.jsonl": rows[:num_train], "heldout.jsonl": rows[num_train:]}
    for name, split in splits.items():
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for offset, row in enumerate(split):
                handle.write(json.dumps({**row, "id": offset}) + "\n")
