"""Field mapping of the common SFT layouts, and errors that name the row and the field."""

from __future__ import annotations

import pytest

from nemo_dft.data.io import DataFormatError
from nemo_dft.generation.config import load_config
from nemo_dft.generation.fields import extract_examples

CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _fmt(*overrides: str):
    return load_config(None, list(overrides)).data.format


def test_messages_chosen_and_query_response_layouts_give_the_same_example() -> None:
    expected_real = CHAT
    layouts = {
        "messages": [{"messages": CHAT, "other": 1}],
        "chosen": [{"prompt": "q", "chosen": CHAT, "rejected": []}],
        "query_response": [{"query": "q", "response": "a", "type": "x"}],
    }
    for layout, rows in layouts.items():
        for fmt in (_fmt(), _fmt(f"data.format.layout={layout}")):
            (example,) = extract_examples(rows, fmt, "in.jsonl")
            assert example.id == 0
            assert example.real == expected_real
            assert example.prompt == CHAT[:1] and example.answer == "a"


def test_custom_field_names_and_id_field() -> None:
    rows = [{"uid": "x7", "question": "q", "solution": "a"}, {"uid": "x8", "question": "q2", "solution": "b"}]
    fmt = _fmt(
        "data.format.query_field=question", "data.format.response_field=solution", "data.format.id_field=uid"
    )
    examples = extract_examples(rows, fmt, "in.jsonl")
    assert [e.id for e in examples] == ["x7", "x8"]
    assert examples[1].real == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]


def test_system_turn_is_kept_in_real() -> None:
    chat = [{"role": "system", "content": "s"}, *CHAT]
    (example,) = extract_examples([{"messages": chat}], _fmt(), "in.jsonl")
    assert example.real == chat


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        ([{"text": "x"}], [], r"cannot detect the layout from the columns \['text'\]"),
        ([{"messages": CHAT}, {"messages": CHAT[:1] + CHAT[:1]}], [], r"in.jsonl: row 1 \(id=1\).*assistant"),
        ([{"messages": CHAT}, {"other": 1}], [], r"row 1 \(id=1\): no field 'messages'"),
        ([{"query": "q", "response": 3}], [], r"row 0 \(id=0\): field 'response' must be a string"),
        (
            [{"id": 5, "messages": CHAT}, {"id": 5, "messages": CHAT}],
            ["data.format.id_field=id"],
            r"row 1 \(id=5\): duplicate id, first seen at row 0",
        ),
        ([{"messages": CHAT}], ["data.format.id_field=pid"], r"row 0: no id field 'pid'"),
        (
            [{"id": 1, "messages": CHAT}, {"id": "2", "messages": CHAT}],
            ["data.format.id_field=id"],
            "mix types",
        ),
        ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}], [], "message 0 needs"),
    ],
)
def test_bad_rows_raise_naming_source_row_and_field(rows, overrides, message) -> None:
    with pytest.raises(DataFormatError, match=message):
        extract_examples(rows, _fmt(*overrides), "in.jsonl")


def test_sharegpt_conversations_with_a_system_column() -> None:
    rows = [
        {"system": "Think first.", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"system": None, "conversations": [{"from": "user", "value": "q2"}, {"from": "assistant", "value": "b"}]},
    ]
    for fmt in (_fmt(), _fmt("data.format.layout=sharegpt")):
        first, second = extract_examples(rows, fmt, "in.jsonl")
        assert first.real == [{"role": "system", "content": "Think first."}, *CHAT]
        assert first.prompt == first.real[:2] and first.answer == "a"
        assert second.real == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    (ignored, _) = extract_examples(rows, _fmt("data.format.system_field=null"), "in.jsonl")
    assert ignored.real == CHAT
    bad = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    with pytest.raises(DataFormatError, match=r"in.jsonl: row 0 \(id=0\), field 'conversations': message 1: "
                                              r"unknown ShareGPT speaker 'bot'"):
        extract_examples(bad, _fmt(), "in.jsonl")
    with pytest.raises(DataFormatError, match=r"row 0 \(id=0\): field 'system' must be a string"):
        extract_examples([{**rows[0], "system": 3}], _fmt(), "in.jsonl")
