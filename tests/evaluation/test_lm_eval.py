"""scripts/lm_eval.py: the paper's task list, the lm_eval command lines built from it (no lm_eval
needed), input errors, and, where lm_eval is installed, a real run of the local task shipped in
conf/lm_eval_tasks against an independent log-likelihood computation."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dft.evaluation.harness import LmEvalConfig, TaskSpec, build_calls
from tests.conftest import REPO

PAPER = {"mmlu": 5, "truthfulqa_mc2": 0, "hellaswag": 10, "winogrande": 5, "gsm8k": 5, "arc_challenge": 25,
         "ifeval": 0}
TASK_DIR = REPO / "conf" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def lm_eval_main():
    spec = importlib.util.spec_from_file_location("lm_eval_script", REPO / "scripts" / "lm_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def hf_dir():
    from nemo_dft.demo.tiny_model import tiny_hf_model_dir

    return tiny_hf_model_dir()


def test_paper_config_lists_the_paper_tasks():
    cfg = OmegaConf.merge(OmegaConf.structured(LmEvalConfig), OmegaConf.load(REPO / "conf" / "lm_eval_paper.yaml"))
    assert {t.name: t.num_fewshot for t in cfg.tasks} == PAPER


def test_dry_run_builds_one_call_per_shot_count(lm_eval_main, hf_dir, capsys):
    code = lm_eval_main(["--model", str(hf_dir), "--dry-run", "model=vllm", "model_args.dtype=float16",
                         "model_args.tensor_parallel_size=2", "limit=3", "output_path=/out"])
    assert code == 0
    calls = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    seen = {}
    for argv in calls:
        assert argv[1:3] == ["-m", "lm_eval"]
        opts = dict(zip(argv[3::2], argv[4::2], strict=True))
        assert opts["--model"] == "vllm" and opts["--limit"] == "3"
        assert opts["--model_args"] == f"pretrained={hf_dir.resolve()},dtype=float16,tensor_parallel_size=2"
        assert opts["--output_path"] == f"/out/fewshot{opts['--num_fewshot']}"
        for task in opts["--tasks"].split(","):
            seen[task] = int(opts["--num_fewshot"])
    assert seen == PAPER and len(calls) == len(set(PAPER.values()))


def test_build_calls_keeps_the_listed_order(tmp_path):
    tasks = [TaskSpec("a", 5), TaskSpec("b", 0), TaskSpec("c", 5)]
    cfg = OmegaConf.structured(LmEvalConfig(include_path=str(TASK_DIR), tasks=tasks))
    calls = build_calls(cfg, tmp_path)
    assert [(c.tasks, c.num_fewshot) for c in calls] == [(["a", "c"], 5), (["b"], 0)]
    assert calls[0].argv[-2:] == ["--include_path", str(TASK_DIR)]
    assert calls[1].output_path == tmp_path / "lm_eval" / "fewshot0"


@pytest.mark.parametrize("case,named", [
    ("not_hf", ["--model", "config.json"]),
    ("backend", ["model", "sglang"]),
    ("pretrained", ["model_args.pretrained"]),
    ("include", ["include_path"]),
])
def test_bad_inputs_exit_2(lm_eval_main, hf_dir, tmp_path, capsys, case, named):
    model, extra = str(hf_dir), []
    if case == "not_hf":
        model = str(tmp_path)
    elif case == "backend":
        extra = ["model=sglang"]
    elif case == "pretrained":
        extra = ["model_args.pretrained=x"]
    else:
        extra = [f"include_path={tmp_path / 'none'}"]
    assert lm_eval_main(["--model", model, "--dry-run", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(part in lines[0] for part in named), lines


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed here")
def test_missing_lm_eval_is_a_one_line_error(lm_eval_main, hf_dir, capsys):
    assert lm_eval_main(["--model", str(hf_dir)]) == 2
    assert "pip install '.[eval]'" in capsys.readouterr().err


def independent_accuracy(model_dir) -> float:
    """The local task by hand: the choice with the highest summed log-likelihood after the context
    (context and continuation split as lm_eval 0.4.13 does for HF models: no BOS for this tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def loglikelihood(context: str, continuation: str) -> float:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        return sum(float(logps[i - 1, whole[i]]) for i in range(start, len(whole)))

    rows = [json.loads(line) for line in (TASK_DIR / "tiny_repeat.jsonl").read_text().splitlines()]
    hits = 0
    for row in rows:
        scores = [loglikelihood(f"Repeat: {row['word']}\nAnswer:", choice) for choice in row["choices"]]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return hits / len(rows)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed in this environment (pip install '.[eval]')")
def test_local_task_through_lm_eval(lm_eval_main, hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model_args: {{dtype: float32}}\nbatch_size: 4\ndevice: cpu\ninclude_path: {TASK_DIR}\n"
                      "tasks:\n  - {name: nemo_dft_tiny_repeat, num_fewshot: 0}\n")
    assert lm_eval_main(["--model", str(hf_dir), "--config", str(config), f"output_path={tmp_path / 'out'}"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    result = summary["nemo_dft_tiny_repeat"]
    assert result["sample_len"] == 8 and result["num_fewshot"] == 0
    assert result["acc,none"] == pytest.approx(independent_accuracy(hf_dir))
