"""Validation of 1-to-m rows: ``real`` plus ``generated_0..K-1`` chats sharing one prompt.

Chats are lists of ``{"role", "content"}`` messages.  ShareGPT-style messages (``{"from", "value"}``
with ``human``/``gpt``/``system``, as in OpenThoughts and OpenR1-Math) and a per-row ``system``
column are accepted too: :func:`normalize_rows` turns them into the role/content form first.
"""

from __future__ import annotations

from typing import Any

POSITIVE_COLUMN = "real"
ID_COLUMN = "id"
SYSTEM_COLUMN = "system"
# ShareGPT speaker names and the chat roles they stand for.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def negative_column(k: int) -> str:
    return f"generated_{k}"


class RowError(ValueError):
    """A row violates the 1-to-m layout; the message names the source, row, id and column."""

    def __init__(self, source: str, index: int, row_id: Any, column: str, reason: str) -> None:
        super().__init__(f"{source}: row {index} (id={row_id!r}), column '{column}': {reason}")
        self.index, self.column = index, column


def _check_chat(chat: Any) -> str | None:
    """Return why ``chat`` is not a usable [..., assistant] conversation, or None."""
    if not isinstance(chat, list) or not chat:
        return f"expected a non-empty list of messages, got {type(chat).__name__}"
    for turn, message in enumerate(chat):
        if not isinstance(message, dict):
            return f"message {turn} is a {type(message).__name__}, not a dict"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {turn} has no string '{key}'"
    if chat[-1]["role"] != "assistant":
        return f"the last message must have role 'assistant', got '{chat[-1]['role']}'"
    if len(chat) < 2:
        return "needs at least one prompt message before the assistant answer"
    return None


def empty_answer_column(row: dict[str, Any], min_negatives: int) -> str | None:
    """The first of ``real``, ``generated_0..min_negatives-1`` whose final answer is empty, or None."""
    for column in [POSITIVE_COLUMN] + [negative_column(k) for k in range(min_negatives)]:
        chat = row.get(column)
        if isinstance(chat, list) and chat and isinstance(chat[-1], dict):
            content = chat[-1].get("content")
            if isinstance(content, str) and not content.strip():
                return column
    return None


def drop_empty_answers(rows: list[dict[str, Any]], min_negatives: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rows without an empty answer among the columns used, and the ids of the rows left out."""
    kept, dropped = [], []
    for index, row in enumerate(rows):
        if empty_answer_column(row, min_negatives) is None:
            kept.append(row)
        else:
            dropped.append(row.get(ID_COLUMN, index))
    return kept, dropped


def count_negatives(row: dict[str, Any]) -> int:
    """Number of consecutive ``generated_k`` columns present, starting at k = 0."""
    k = 0
    while negative_column(k) in row and row[negative_column(k)] is not None:
        k += 1
    return k


def validate_dft_rows(rows: list[dict[str, Any]], source: str, min_negatives: int,
                      allow_empty_answers: bool = False) -> None:
    """Raise :class:`RowError` for the first row that the trainer cannot use.

    Checks: unique ids (when an ``id`` column is present), a well-formed ``real`` chat, at least
    ``min_negatives`` negative columns, each a well-formed chat with the same prompt as ``real``,
    and no empty answer in any of them (unless ``allow_empty_answers``).
    """
    if not rows:
        raise ValueError(f"{source}: the dataset has no rows")
    seen_ids: dict[Any, int] = {}
    for index, row in enumerate(rows):
        row_id = row.get(ID_COLUMN, index)
        if row_id in seen_ids:
            raise RowError(source, index, row_id, ID_COLUMN, f"duplicate id, first seen at row {seen_ids[row_id]}")
        seen_ids[row_id] = index
        reason = _check_chat(row.get(POSITIVE_COLUMN))
        if reason:
            raise RowError(source, index, row_id, POSITIVE_COLUMN, reason)
        prompt = row[POSITIVE_COLUMN][:-1]
        available = count_negatives(row)
        if available < min_negatives:
            raise RowError(
                source, index, row_id, negative_column(available),
                f"missing: {min_negatives} negatives are needed (num_negatives x epochs), found {available}",
            )
        for k in range(min_negatives):
            column = negative_column(k)
            reason = _check_chat(row[column])
            if reason is None and row[column][:-1] != prompt:
                reason = "its prompt differs from the prompt of 'real'"
            if reason:
                raise RowError(source, index, row_id, column, reason)
        empty = None if allow_empty_answers else empty_answer_column(row, min_negatives)
        if empty is not None:
            raise RowError(source, index, row_id, empty, "the answer is empty (set data.empty_answers=drop to "
                           "leave such rows out, or keep to train on them as the paper does)")


def normalize_message(message: Any) -> Any:
    """A ShareGPT ``{"from", "value"}`` message as ``{"role", "content"}``; anything else unchanged
    (role/content messages, and malformed ones, which validation then reports).

    Raises ValueError for a speaker that has no chat role.
    """
    if not isinstance(message, dict) or "role" in message or "from" not in message:
        return message
    speaker = message["from"]
    if speaker not in SHAREGPT_ROLES:
        raise ValueError(f"unknown ShareGPT speaker {speaker!r} (known: {sorted(SHAREGPT_ROLES)})")
    return {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}


def with_system(chat: list[dict[str, Any]], system: Any) -> list[dict[str, Any]]:
    """``chat`` led by a ``system`` turn, unless it is empty or the chat already starts with one."""
    if not system or (chat and isinstance(chat[0], dict) and chat[0].get("role") == "system"):
        return chat
    return [{"role": "system", "content": system}, *chat]


def normalize_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Rows whose chat columns are in role/content form, with the row's ``system`` column (if any)
    as the leading system turn of every chat; errors name the row, column and message."""
    normalized: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        row_id = row.get(ID_COLUMN, index)
        system = row.get(SYSTEM_COLUMN)
        if system is not None and not isinstance(system, str):
            raise RowError(source, index, row_id, SYSTEM_COLUMN, f"must be a string, got {type(system).__name__}")
        out = dict(row)
        for column in [POSITIVE_COLUMN] + [negative_column(k) for k in range(count_negatives(row))]:
            chat = row.get(column)
            if not isinstance(chat, list):
                continue  # validation reports it
            messages = []
            for turn, message in enumerate(chat):
                try:
                    messages.append(normalize_message(message))
                except ValueError as err:
                    raise RowError(source, index, row_id, column, f"message {turn}: {err}") from err
            out[column] = with_system(messages, system)
        normalized.append(out)
    return normalized
