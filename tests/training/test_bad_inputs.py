"""Bad inputs are refused before any NeMo/megatron set-up: exit 2 and one ``error:`` line naming the
file, row, column and key (no traceback).  Runs scripts/train_dft.py's main in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO

TASK = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task"


def rows(n: int = 4) -> list[dict]:
    return [json.loads(line) for line in (TASK / "train.jsonl").read_text().splitlines()[:n]]


def write(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def non_utf8(tmp: Path) -> Path:
    path = write(tmp / "bytes.jsonl", rows())
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Repeat", b"Rep\xffeat", 1)
    path.write_bytes(b"\n".join(lines))
    return path


def empty_answer(tmp: Path) -> Path:
    data = rows()
    data[2]["generated_1"][-1]["content"] = "  "
    return write(tmp / "empty.jsonl", data)


def missing_negative(tmp: Path) -> Path:
    data = rows()
    del data[1]["generated_0"]
    return write(tmp / "missing.jsonl", data)


def bad_json(tmp: Path) -> Path:
    path = write(tmp / "bad.jsonl", rows())
    path.write_text(path.read_text() + '{"id": 9, "real": [\n')
    return path


def tokenizer_without_template(tmp: Path) -> str:
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    config = json.loads((tiny_tokenizer_dir() / "tokenizer.json").read_text())
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.json").write_text(json.dumps(config))
    return f"tokenizer.path={tmp / 'tok'}"


# (overrides, or a function making data.path; what the one error line must name)
CASES = {
    "max_steps_0": (["trainer.max_steps=0"], ["trainer.max_steps", ">= 1"]),
    "tp_above_query_groups": (["model.tensor_model_parallel_size=4", "trainer.devices=4"],
                              ["model.tensor_model_parallel_size", "num_query_groups=2"]),
    "non_utf8_byte": (non_utf8, ["data.path", "bytes.jsonl:3", "column", "0xff", "UTF-8"]),
    "empty_answer": (empty_answer, ["data.path", "row 2", "generated_1", "empty", "data.empty_answers"]),
    "missing_negative": (missing_negative, ["data.path", "row 1", "generated_0", "missing"]),
    "invalid_json": (bad_json, ["data.path", "bad.jsonl:5", "column", "invalid JSON"]),
    "tp_above_mistral_query_groups": (
        ["model.preset=null", "model.tensor_model_parallel_size=16", "trainer.devices=16"],
        ["model.tensor_model_parallel_size", "num_query_groups=8"]),
    "unknown_arch": (["model.arch=gemma2"], ["model.arch", "gemma2", "qwen3"]),
    "tp_above_qwen3_query_groups": (
        ["model.arch=qwen3", "model.preset=null", "model.tensor_model_parallel_size=16", "trainer.devices=16"],
        ["model.tensor_model_parallel_size", "num_query_groups=8"]),
    "tokenizer_path_missing": (["tokenizer.path=/nonexistent/tok"], ["tokenizer.path", "/nonexistent/tok"]),
    "tokenizer_path_not_a_tokenizer": ([f"tokenizer.path={TASK}"], ["tokenizer.path", "not an HF tokenizer"]),
    "tokenizer_without_template": (tokenizer_without_template, ["tokenizer.chat_template", "no chat template"]),
    "unknown_template_name": (["tokenizer.chat_template=chatml"], ["tokenizer.chat_template", "chatml"]),
    "nonfinite_mode": (["trainer.nonfinite=ignore"], ["trainer.nonfinite"]),
    "eval_interval_0": (["trainer.val_check_interval=0"], ["trainer.val_check_interval"]),
    "objective_contradicts_ref_free": (["dft.objective=dft", "dft.ref_free=true"], ["dft.objective", "dft.ref_free"]),
    "objective_unknown": (["dft.objective=ppo"], ["dft.objective", "sft"]),
    "no_negatives_for_dft2": (["dft.objective=dft2", "dft.num_negatives=0"], ["dft.num_negatives", "sft"]),
    "min_lr_above_lr": (["optim.lr=1e-5", "optim.min_lr=3e-4"], ["optim.min_lr", "optim.lr=1e-05"]),
}


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_dft_script", REPO / "scripts" / "train_dft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, train_main, tmp_path, capsys):
    make, named = CASES[case]
    made = None if isinstance(make, list) else make(tmp_path)
    overrides = make if made is None else [made if "=" in str(made) else f"data.path={made}"]
    code = train_main([f"run.dir={tmp_path / 'run'}", "trainer.progress_bar=false", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for part in named:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_sft_without_negatives_needs_no_generated_columns(tmp_path):
    """dft.objective=sft with dft.num_negatives=0 reads rows that have only ``real`` and builds groups
    of the positive alone; with negatives asked for, the same file is refused naming the column."""
    from transformers import AutoTokenizer

    from nemo_dft.config.loading import ConfigError
    from nemo_dft.config.training import load_config
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir
    from nemo_dft.training.train import build_datasets, read_checked_rows

    data = write(tmp_path / "positives.jsonl", [{"id": r["id"], "real": r["real"]} for r in rows()])
    cfg = load_config(None, [f"data.path={data}", "data.eval_path=null", "dft.objective=sft", "dft.num_negatives=0"])
    assert cfg.dft.ref_free  # no reference model for SFT
    checked = read_checked_rows(cfg)
    train, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir())), checked)
    assert train.num_examples == 4 and len(train.group(0)["pairs"]) == 1
    cfg = load_config(None, [f"data.path={data}", "data.eval_path=null", "dft.objective=sft"])
    with pytest.raises(ConfigError, match="generated_0"):
        read_checked_rows(cfg)
