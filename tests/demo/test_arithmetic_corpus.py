"""The pre-training corpus of the paper regime: the task's facts, never its layout or prompts."""

from __future__ import annotations

import re

from nemo_dft.demo import arithmetic_corpus, arithmetic_task

# Written out here, not imported: what the base must never see.
ALPACA_HEADER = "Below is an instruction that describes a task."
NEVER = ("The answer is:", "The answer is", "### Question:", "### Response:", "### Instruction:", ALPACA_HEADER,
         "<|user|>", "<|assistant|>", "How many", "?")
FULL_SIZE = 64000  # benchmarks/dft_vs_sft.py's corpus_problems


def test_the_whole_corpus_never_shows_the_template_the_prompt_or_the_answer_phrase() -> None:
    rows = arithmetic_corpus.corpus_rows(FULL_SIZE, seed=0)
    assert len(rows) > FULL_SIZE // 2
    texts = [r["real"][-1]["content"] for r in rows]
    for phrase in NEVER:
        hits = [i for i, text in enumerate(texts) if phrase.lower() in text.lower()]
        assert not hits, f"{phrase!r} in documents {hits[:5]}"
    assert all(r["real"][0] == {"role": "user", "content": ""} for r in rows)


def test_every_stated_fact_is_true_and_every_form_occurs() -> None:
    texts = [r["real"][-1]["content"] for r in arithmetic_corpus.corpus_rows(4000, seed=3)]
    equations = [m for text in texts for m in re.finditer(r"(\d+) ([+-]) (\d+) = (\d+)", text)]
    assert len(equations) > 1000
    for m in equations:
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (a + b if op == "+" else a - b) == c, m[0]
    joined = "\n".join(texts)
    assert " counts " in joined and re.search(r"\d+, \d+, \d+", joined)
    # stories state a result with the name and object of their setup
    stated = re.findall(r"(?:Now|now|So|so) (\w+) has (\d+) (\w+)", joined)
    assert len(stated) > 500


def test_a_story_states_the_problems_result() -> None:
    import random

    rng = random.Random(11)
    for _ in range(200):
        problem = arithmetic_task.draw_problem(rng)
        story = arithmetic_corpus.story(problem, rng)
        assert story.startswith(problem.setup)
        assert f"{problem.name} with {problem.answer} {problem.item}" in story or \
            f"{problem.name} has {problem.answer} {problem.item}" in story


def test_excluded_questions_never_appear() -> None:
    splits = arithmetic_task.make_splits({"finetune": 300, "heldout": 300}, seed=0)
    excluded = {r["real"][0]["content"] for rows in splits.values() for r in rows}
    setups = {q.rsplit(" How many", 1)[0] for q in excluded}
    texts = " ".join(r["real"][-1]["content"] for r in arithmetic_corpus.corpus_rows(3000, 0, excluded))
    # a setup may recur inside another problem's story only if that problem is not excluded; the
    # two-step setups are specific enough to check directly
    two_step = [s for s in setups if s.count(".") == 3]
    assert two_step and not [s for s in two_step if s in texts]


def test_documents_render_after_an_end_of_text_token_with_no_prompt_mask_left() -> None:
    from jinja2 import Template

    row = arithmetic_corpus.corpus_rows(10, seed=0)[0]
    rendered = Template(arithmetic_corpus.DOCUMENT_TEMPLATE).render(messages=row["real"], eos_token="</s>")
    prompt = Template(arithmetic_corpus.DOCUMENT_TEMPLATE).render(messages=row["real"][:1], eos_token="</s>")
    assert prompt == "</s>"
    assert rendered == "</s>" + row["real"][-1]["content"] + "</s>"
