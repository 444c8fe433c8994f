"""Mapping the common SFT layouts onto (id, prompt chat, reference answer).

Supported layouts: a ``messages`` chat, a ``chosen`` chat (UltraFeedback style), a ShareGPT
``conversations`` list (OpenThoughts / OpenR1-Math style: ``{"from": "human"|"gpt"|"system",
"value": ...}``), each ending with the assistant's answer, and a ``query``/``response`` pair
(MetaMathQA style).  Messages of any chat layout may be role/content or from/value.  A row's
``system`` field (``data.format.system_field``), when a non-empty string, leads the chat as a
system turn.  Field names are configurable; ``auto`` picks the first layout whose fields the first
row has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_dft.data.io import DataFormatError
from nemo_dft.data.rows import normalize_message, with_system

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``real`` is the chat the trainer reads as positive."""

    id: int | str
    real: list[Message]

    @property
    def prompt(self) -> list[Message]:
        return self.real[:-1]

    @property
    def answer(self) -> str:
        return self.real[-1]["content"]


def detect_layout(row: dict[str, Any], fmt: Any) -> str:
    """The layout named by ``fmt.layout``, or for ``auto`` the first one whose fields exist."""
    if fmt.layout != "auto":
        return str(fmt.layout)
    if fmt.messages_field in row:
        return "messages"
    if fmt.chosen_field in row:
        return "chosen"
    if fmt.conversations_field in row:
        return "sharegpt"
    if fmt.query_field in row and fmt.response_field in row:
        return "query_response"
    raise DataFormatError(
        f"cannot detect the layout from the columns {sorted(row)}: expected '{fmt.messages_field}', "
        f"'{fmt.chosen_field}', '{fmt.conversations_field}' or '{fmt.query_field}'+'{fmt.response_field}' "
        "(see data.format.*)"
    )


def _chat(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or len(value) < 2:
        raise DataFormatError(f"{where}: expected a chat (list of >= 2 messages), got {type(value).__name__}")
    chat: list[Message] = []
    for turn, message in enumerate(value):
        try:
            message = normalize_message(message)
        except ValueError as err:
            raise DataFormatError(f"{where}: message {turn}: {err}") from err
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise DataFormatError(
                f"{where}: message {turn} needs string 'role' and 'content' (or ShareGPT 'from' and 'value')"
            )
        chat.append({"role": message["role"], "content": message["content"]})
    if chat[-1]["role"] != "assistant":
        raise DataFormatError(
            f"{where}: the last message must be the assistant's answer, got '{chat[-1]['role']}'"
        )
    if not any(m["role"] == "user" for m in chat[:-1]):
        raise DataFormatError(f"{where}: no user message before the answer")
    return chat


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _system(row: dict[str, Any], fmt: Any, where: str) -> str | None:
    """The row's system prompt (``data.format.system_field``), if it has one."""
    if fmt.system_field is None or row.get(fmt.system_field) is None:
        return None
    value = row[fmt.system_field]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{fmt.system_field}' must be a string, got {type(value).__name__}")
    return value


def extract_examples(rows: list[dict[str, Any]], fmt: Any, source: str) -> list[Example]:
    """Examples in input order; errors name the source, the row and the field."""
    if not rows:
        raise DataFormatError(f"{source}: the input has no rows")
    layout = detect_layout(rows[0], fmt)
    field = {"messages": fmt.messages_field, "chosen": fmt.chosen_field,
             "sharegpt": fmt.conversations_field}.get(layout)
    examples: list[Example] = []
    seen: dict[int | str, int] = {}
    for index, row in enumerate(rows):
        if fmt.id_field is None:
            example_id: Any = index
        elif fmt.id_field not in row:
            raise DataFormatError(
                f"{source}: row {index}: no id field '{fmt.id_field}' (data.format.id_field)"
            )
        else:
            example_id = row[fmt.id_field]
        if isinstance(example_id, bool) or not isinstance(example_id, (int, str)):
            raise DataFormatError(f"{source}: row {index}: id must be an int or a string, got {example_id!r}")
        where = f"{source}: row {index} (id={example_id!r})"
        if examples and type(example_id) is not type(examples[0].id):
            raise DataFormatError(f"{where}: ids mix types ({type(examples[0].id).__name__} in row 0)")
        if example_id in seen:
            raise DataFormatError(f"{where}: duplicate id, first seen at row {seen[example_id]}")
        seen[example_id] = index
        if field is not None:
            if field not in row:
                raise DataFormatError(f"{where}: no field '{field}' (layout {layout})")
            real = _chat(row[field], f"{where}, field '{field}'")
        else:
            query = _text(row, fmt.query_field, where)
            response = _text(row, fmt.response_field, where)
            real = [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        examples.append(Example(id=example_id, real=with_system(real, _system(row, fmt, where))))
    return examples
