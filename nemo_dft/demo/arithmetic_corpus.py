"""A generic pre-training corpus for the arithmetic task: its facts, never its question/answer layout.

The paper fine-tunes a base that was only pre-trained (Mistral-7B-v0.1): it knows arithmetic from
ordinary text, but has never seen MetaMathQA's prompt or its "The answer is:" ending.  This corpus
gives the miniature benchmark such a base.  Every document is running text about the task's world
(the same names, objects and numbers below 100), in one of three forms:

- ``story``: a problem's setup, then its result stated inline ("... Now Ann has 7 pens."),
  sometimes with the arithmetic written out in the sentence;
- ``equations``: bare sums and differences, one fact after another ("12 + 5 = 17. 9 - 4 = 5.");
- ``counting``: a run of consecutive numbers ("Bob counts his cards: 4, 5, 6, 7.").

It never contains the fine-tuning template, the generation prompt, a question, or the answer
phrase (:data:`FORBIDDEN`; the tests check the whole corpus).  A document is trained on whole with
a plain language-model objective: :data:`DOCUMENT_TEMPLATE` renders it after an end-of-text token,
as documents follow one another in a pre-training stream.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from nemo_dft.data.io import write_text_atomic
from nemo_dft.demo.arithmetic_task import ANSWER_PREFIX, MAX_OPERAND, NAMES, Problem, draw_problem

FORMS = ("story", "equations", "counting")
FORM_WEIGHTS = (0.6, 0.25, 0.15)
# What the base must never see: the answer phrase, any question, and the prompts of fine-tuning
# (alpaca), generation (the paper's MetaMath prompt) and the tiny chat template.
FORBIDDEN = (ANSWER_PREFIX, "answer is", "?", "###", "Below is an instruction", "Response", "Question",
             "Instruction", "<|user|>", "<|assistant|>", "How many")

# The user turn renders as the end-of-text token that precedes a document in a pre-training stream
# (so the loss covers the document's first token); the assistant turn is the document, then EOS.
DOCUMENT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
STATEMENTS = ("Now {name} has {n} {item}.", "So {name} has {n} {item} now.", "That leaves {name} with {n} {item}.",
              "In the end {name} has {n} {item}.")
PRONOUNS = ("her", "his")


def story(problem: Problem, rng: random.Random) -> str:
    """The problem's setup and its result as a statement, with the arithmetic shown half the time."""
    result = rng.choice(STATEMENTS).format(name=problem.name, n=problem.answer, item=problem.item)
    if rng.random() < 0.5:
        work = " ".join(step.rstrip(".") + "," for step in problem.steps)
        result = f"{work} {result[0].lower()}{result[1:]}"
    return f"{problem.setup} {result}"


def equations(rng: random.Random, count: int) -> str:
    facts = []
    for _ in range(count):
        a, b = rng.randint(1, 2 * MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        high, low = max(a, b), min(a, b)
        facts.append(f"{a} + {b} = {a + b}." if rng.random() < 0.5 else f"{high} - {low} = {high - low}.")
    return " ".join(facts)


def counting(rng: random.Random) -> str:
    start = rng.randint(0, 2 * MAX_OPERAND)
    numbers = ", ".join(str(n) for n in range(start, start + rng.randint(4, 9)))
    if rng.random() < 0.5:
        return f"{numbers}."
    things = rng.choice(("pens", "cards", "coins", "eggs"))
    return f"{rng.choice(NAMES)} counts {rng.choice(PRONOUNS)} {things}: {numbers}."


def documents(problems: list[Problem], seed: int = 0) -> Iterator[str]:
    """One document per problem (two stories, or one with equations or counting beside it) in a
    seeded order of forms; every problem's result is stated once."""
    rng = random.Random(seed)
    pending = list(problems)
    while pending:
        form = rng.choices(FORMS, FORM_WEIGHTS)[0]
        if form == "story":
            parts = [story(pending.pop(), rng) for _ in range(min(2, len(pending)))]
        elif form == "equations":
            parts = [story(pending.pop(), rng), equations(rng, rng.randint(3, 6))]
        else:
            parts = [counting(rng), story(pending.pop(), rng)]
        rng.shuffle(parts)
        yield " ".join(parts)


def corpus_rows(count: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[dict]:
    """Rows of documents (the training layout: an empty user turn, the document as the answer)
    drawn from ``count`` problems whose question is not in ``exclude``."""
    rng = random.Random(seed + 7919)
    problems: list[Problem] = []
    while len(problems) < count:
        problem = draw_problem(rng)
        if problem.question not in exclude:
            problems.append(problem)
    return [{"id": i, "real": [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]}
            for i, text in enumerate(documents(problems, seed))]


def forbidden_in(text: str) -> str | None:
    """The first forbidden phrase that ``text`` contains, or None."""
    return next((phrase for phrase in FORBIDDEN if phrase in text), None)


def write_corpus(path: Path, count: int, seed: int = 0, exclude: set[str] = frozenset()) -> int:
    """Write the corpus as JSONL (atomically) after checking every document; returns its row count."""
    rows = corpus_rows(count, seed, exclude)
    for row in rows:
        phrase = forbidden_in(row["real"][-1]["content"])
        if phrase is not None:
            raise ValueError(f"pre-training document {row['id']} contains {phrase!r}")
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
