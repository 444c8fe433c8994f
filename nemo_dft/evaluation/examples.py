"""Evaluation rows: the training layout (``real`` plus optional ``generated_k`` chats, ShareGPT
messages and a ``system`` column included) or prompts with reference answers (``prompt``/``answer``,
``question``/``answer``, ``query``/``response``, ``instruction``/``output``, or a ``messages`` chat)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_dft.data.io import read_rows
from nemo_dft.data.rows import (
    ID_COLUMN,
    POSITIVE_COLUMN,
    RowError,
    _check_chat,
    count_negatives,
    negative_column,
    normalize_rows,
)

Chat = list[dict[str, str]]
PAIR_COLUMNS = (("prompt", "answer"), ("question", "answer"), ("query", "response"), ("instruction", "output"))


@dataclass(frozen=True)
class EvalExample:
    id: Any
    prompt: Chat  # the messages before the answer
    reference: str  # the positive answer's text
    negatives: list[str]  # the negatives' answer texts (same prompt)

    def chat(self, answer: str) -> Chat:
        return [*self.prompt, {"role": "assistant", "content": answer}]


def _as_training_row(row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
    """A prompt/answer row as a ``real`` chat; training rows unchanged."""
    if POSITIVE_COLUMN in row:
        return row
    if isinstance(row.get("messages"), list):
        return {**row, POSITIVE_COLUMN: row["messages"]}
    for prompt_key, answer_key in PAIR_COLUMNS:
        if prompt_key in row:
            for key in (prompt_key, answer_key):
                if not isinstance(row.get(key), str):
                    raise RowError(source, index, row.get(ID_COLUMN, index), key, "missing or not a string")
            return {**row, POSITIVE_COLUMN: [{"role": "user", "content": row[prompt_key]},
                                             {"role": "assistant", "content": row[answer_key]}]}
    raise RowError(source, index, row.get(ID_COLUMN, index), POSITIVE_COLUMN,
                   "missing: a row needs 'real' (a chat), 'messages', or a prompt and its answer "
                   f"({', '.join('/'.join(p) for p in PAIR_COLUMNS)})")


def load_examples(path: str, limit: int | None = None, negatives: int | None = None) -> list[EvalExample]:
    """Read and check ``path`` (DataFormatError / RowError name the file, row, column and key).

    ``limit``: the first rows only; ``negatives``: at most that many ``generated_k`` per row."""
    source = str(path)
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise RowError(source, 0, None, POSITIVE_COLUMN, "the file has no rows")
    rows = normalize_rows([_as_training_row(r, source, i) for i, r in enumerate(rows)], source)
    examples, seen = [], {}
    for index, row in enumerate(rows):
        row_id = row.get(ID_COLUMN, index)
        if row_id in seen:
            raise RowError(source, index, row_id, ID_COLUMN, f"duplicate id, first seen at row {seen[row_id]}")
        seen[row_id] = index
        real = row[POSITIVE_COLUMN]
        reason = _check_chat(real)
        if reason:
            raise RowError(source, index, row_id, POSITIVE_COLUMN, reason)
        count = count_negatives(row) if negatives is None else min(negatives, count_negatives(row))
        answers = []
        for k in range(count):
            chat = row[negative_column(k)]
            reason = _check_chat(chat)
            if reason is None and chat[:-1] != real[:-1]:
                reason = "its prompt differs from the prompt of 'real'"
            if reason:
                raise RowError(source, index, row_id, negative_column(k), reason)
            answers.append(chat[-1]["content"])
        examples.append(EvalExample(row_id, real[:-1], real[-1]["content"], answers))
    return examples
