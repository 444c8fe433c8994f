"""The README's configuration table against the config schema: every key it names exists with
the stated default, and every key of the schema is in the table."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from nemo_dft.config.training import TrainConfig
from tests.conftest import REPO

# Words the table uses for defaults that are not literal values.
WORDS = {"none": None, "null": None, "all epochs": None, "tiny tokenizer": None}
EMBEDDED = "embedded task"  # the shipped tiny task's files


def table_rows() -> list[tuple[list[str], list[str]]]:
    text = (REPO / "README.md").read_text()
    table = text.split("| key | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:  # after the |---| line
        keys_cell, default_cell = [cell.strip() for cell in line.strip("|").split(" | ")[:2]]
        keys = re.findall(r"`([^`]+)`", keys_cell)
        defaults = [d.strip() for d in re.split(r",\s*(?![^\[]*\])", default_cell)]  # not inside [...]
        rows.append((keys, defaults))
    return rows


def schema_leaves() -> dict[str, object]:
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and key != "config":
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(OmegaConf.to_container(OmegaConf.structured(TrainConfig))))


def parse_default(text: str):
    if text in WORDS:
        return WORDS[text]
    if text.startswith("`") and text.endswith("`"):
        literal = text.strip("`")
        return [s.strip() for s in literal.strip("[]").split(",")] if literal.startswith("[") else literal
    if text in ("true", "false"):
        return text == "true"
    return float(text)


ROWS = table_rows()


def test_table_is_found():
    assert len(ROWS) > 20


@pytest.mark.parametrize("keys,defaults", ROWS, ids=[", ".join(k) for k, _ in ROWS])
def test_every_key_exists_with_the_stated_default(keys, defaults):
    schema = schema_leaves()
    assert len(keys) == len(defaults) or len(defaults) == 1, f"{keys}: {len(defaults)} defaults"
    for key, text in zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults, strict=True):
        if key == "model.config.<field>":
            assert "model.config" in schema and text == "none"
            continue
        assert key in schema, f"README names {key}, which the schema does not have"
        if text == EMBEDDED:
            assert "demo/assets/tiny_task" in str(schema[key]), key
            continue
        expected = parse_default(text)
        if isinstance(expected, float) and not isinstance(schema[key], bool):
            assert schema[key] == pytest.approx(expected), f"{key}: README says {text}, schema has {schema[key]}"
        else:
            assert schema[key] == expected, f"{key}: README says {text}, schema has {schema[key]!r}"


def test_every_schema_key_is_documented():
    documented = {key for keys, _ in ROWS for key in keys}
    missing = sorted(k for k in schema_leaves() if k not in documented and k != "model.config")
    assert missing == [], f"keys missing from the README table: {missing}"
