"""The arithmetic word-problem task: worked answers checked against the question's own numbers."""

from __future__ import annotations

import json
import re

import pytest

from nemo_dft.demo import arithmetic_task as task

SIZES = {"pretrain": 300, "finetune": 120, "validation": 40, "heldout": 500}


def _solve(question: str) -> int:
    """The answer read off the question's wording, independently of the generator's arithmetic."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if "more." in question and "gives away" in question:  # two steps: has a, gets b, gives away c
        a, b, c = numbers
        return a + b - c
    if "gets" in question:
        a, b = numbers
        return a + b
    a, b = numbers
    return a - b


def test_splits_are_deterministic_disjoint_and_of_the_asked_sizes() -> None:
    first, again, other = task.make_splits(SIZES, 7), task.make_splits(SIZES, 7), task.make_splits(SIZES, 8)
    assert first == again
    assert first != other
    questions = {split: [r["real"][0]["content"] for r in rows] for split, rows in first.items()}
    assert {s: len(q) for s, q in questions.items()} == SIZES
    every = [q for qs in questions.values() for q in qs]
    assert len(set(every)) == len(every), "a question is in two splits (or twice in one)"
    assert all([r["id"] for r in rows] == list(range(len(rows))) for rows in first.values())


def test_worked_answers_are_right() -> None:
    rows = [r for rows in task.make_splits(SIZES, 3).values() for r in rows]
    kinds = set()
    for row in rows:
        question, answer = row["real"][0]["content"], row["real"][1]["content"]
        assert answer.endswith(f"{task.ANSWER_PREFIX} {_solve(question)}"), (question, answer)
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", answer):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), answer
        assert _solve(question) >= 0
        kinds.add(answer.count("="))
    assert kinds == {1, 2}, "both one- and two-step problems occur"


@pytest.mark.parametrize(("text", "expected"), [
    ("3 + 4 = 7. The answer is: 7", "7"),
    ("The answer is: 12.", "12"),
    ("The answer is: 1 The answer is: 9", "9"),
    ("3 + 4 = 7.", None),
    ("The answer is:", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert task.extract_answer(text) == expected


def test_write_splits_writes_the_rows(tmp_path) -> None:
    paths = task.write_splits(tmp_path, {"finetune": 5, "heldout": 3}, seed=1)
    rows = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    assert rows == task.make_splits({"finetune": 5, "heldout": 3}, 1)
    with pytest.raises(ValueError, match="unknown split"):
        task.make_splits({"train": 3})


def test_task_tokenizer_keeps_numbers_whole_and_round_trips(tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task.task_tokenizer_dir(tmp_path)))
    assert len(tokenizer) == 512
    vocab = tokenizer.get_vocab()
    assert all(f"Ġ{n}" in vocab for n in range(2 * task.MAX_OPERAND + 1))
    row = task.make_splits({"heldout": 1}, 0)["heldout"][0]
    text = tokenizer.apply_chat_template(row["real"], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2, "words and numbers are single tokens, not bytes"
