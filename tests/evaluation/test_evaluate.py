"""scripts/evaluate.py on a tiny HF model against independent computations: HF ``generate``
greedy plus the extraction for accuracy, and a plain ``log_softmax`` over sequences tokenized here
(not with nemo_dft's tokenization code) for the log-probs and ranking accuracies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nemo_dft.evaluation.extraction import normalize_text
from tests.conftest import REPO

TASK = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task"
ROWS = 6
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dft.demo.tiny_model import tiny_hf_model_dir

    path = tiny_hf_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(str(path))


def independent_answer(model, tokenizer, prompt_messages) -> str:
    """HF greedy, one prompt at a time, from the zephyr prompt text; the header stripped by hand."""
    text = tokenizer.apply_chat_template(prompt_messages, tokenize=False)
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    answer = tokenizer.decode(new, skip_special_tokens=False)
    return answer[len("<|assistant|>\n"):].strip() if answer.startswith("<|assistant|>\n") else answer.strip()


def independent_logp(model, tokenizer, chat) -> tuple[float, int]:
    """Summed response log-prob: BOS + template(prompt) + template(chat) rest + EOS, log_softmax."""
    prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # no merge at the boundary in this task
    ids = [tokenizer.bos_token_id, *full_ids, tokenizer.eos_token_id]
    start = 1 + len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return float(logps[start - 1:].sum()), len(ids) - start


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """Held-out rows whose even rows' reference is the model's own greedy answer (so that exact
    accuracy is 1/2, not a trivial 0), with 3 negatives each."""
    _, model, tokenizer = tiny
    rows = [json.loads(line) for line in (TASK / "heldout.jsonl").read_text().splitlines()[:ROWS]]
    answers = []
    for i, row in enumerate(rows):
        answer = independent_answer(model, tokenizer, row["real"][:-1])
        answers.append(answer)
        if i % 2 == 0:
            row["real"][-1]["content"] = answer
        for k in range(3, 8):
            row.pop(f"generated_{k}", None)
    path = tmp_path_factory.mktemp("eval") / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, answers


@pytest.mark.parametrize("batch_size", [1, 4])
def test_accuracy_and_scores_match_independent_computation(evaluate_main, tiny, planted, tmp_path, batch_size):
    model_dir, model, tokenizer = tiny
    data, rows, answers = planted
    out = tmp_path / "results.json"
    code = evaluate_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "extract=exact",
                          f"max_new_tokens={NEW_TOKENS}", f"batch_size={batch_size}", "backend=hf", "progress=false"])
    assert code == 0
    result = json.loads(out.read_text())
    expected_correct = [normalize_text(a) == normalize_text(r["real"][-1]["content"])
                        for a, r in zip(answers, rows, strict=True)]
    assert expected_correct == [i % 2 == 0 for i in range(ROWS)]  # the planting worked
    assert [e["prediction"] for e in result["examples"]] == answers
    assert [e["correct"] for e in result["examples"]] == expected_correct
    assert result["n"] == ROWS and result["accuracy"] == pytest.approx(sum(expected_correct) / ROWS)

    pos, neg, avg_correct, sum_correct = [], [], [], []
    for row, record in zip(rows, result["examples"], strict=True):
        p, p_len = independent_logp(model, tokenizer, row["real"])
        negs = [independent_logp(model, tokenizer, row[f"generated_{k}"]) for k in range(3)]
        assert record["pos_logp"] == pytest.approx(p, abs=1e-4)
        assert record["pos_tokens"] == p_len
        assert record["neg_logps"] == pytest.approx([n for n, _ in negs], abs=1e-4)
        pos.append(p)
        neg += [n for n, _ in negs]
        avg_correct.append(all(p / p_len > n / n_len for n, n_len in negs))
        sum_correct.append(all(p > n for n, _ in negs))
    assert result["mean_pos_logp"] == pytest.approx(sum(pos) / ROWS, abs=1e-4)
    assert result["mean_neg_logp"] == pytest.approx(sum(neg) / len(neg), abs=1e-4)
    assert result["rank_acc"] == pytest.approx(sum(avg_correct) / ROWS)
    assert result["rank_acc_sum"] == pytest.approx(sum(sum_correct) / ROWS)


def test_prompt_answer_rows_without_negatives(evaluate_main, tiny, tmp_path, capsys):
    """Prompts with reference answers: accuracy and log-probs; rank_acc is null without negatives."""
    model_dir, _, _ = tiny
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Repeat: c a {c}", "answer": f"The answer is: {i}"}) + "\n"
                            for i, c in enumerate("tgn")))
    out = tmp_path / "r.json"
    assert evaluate_main(["--model", str(model_dir), "--data", str(data), "--out", str(out),
                          "max_new_tokens=4", "backend=hf", "progress=false"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["rank_acc"] is None and result["rank_acc_sum"] is None
    assert result["mean_pos_logp"] < 0
    extracted = sum("the answer is" in e["prediction"].lower() for e in result["examples"])
    assert result["n_extracted"] == extracted
    printed = capsys.readouterr().out
    assert "rank_acc" in printed and "n/a" in printed
    if extracted == 0:  # 4 tokens of an untrained model: no answer to read, so no accuracy (not 0.0)
        assert result["accuracy"] is None and "n_extracted 0" in printed
    else:
        assert result["accuracy"] == sum(e["correct"] for e in result["examples"]) / 3


def _bad_row(tmp: Path) -> Path:
    path = tmp / "bad.jsonl"
    rows = [json.loads(line) for line in (TASK / "heldout.jsonl").read_text().splitlines()[:3]]
    rows[1]["generated_1"] = [{"role": "user", "content": "another prompt"}, {"role": "assistant", "content": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case,named", [
    ("missing_data", ["--data", "does not exist"]),
    ("missing_model", ["--model", "does not exist"]),
    ("bad_row", ["--data", "bad.jsonl", "row 1", "generated_1", "prompt differs"]),
    ("no_columns", ["--data", "row 0", "real", "missing"]),
    ("bad_extract", ["extract", "fuzzy"]),
    ("unknown_key", ["temperature"]),
])
def test_bad_inputs_exit_2_with_one_line(evaluate_main, tiny, tmp_path, capsys, case, named):
    model_dir = str(tiny[0])
    data = str(TASK / "heldout.jsonl")
    extra: list[str] = []
    if case == "missing_data":
        data = str(tmp_path / "nothing.jsonl")
    elif case == "missing_model":
        model_dir = str(tmp_path / "no-model")
    elif case == "bad_row":
        data = str(_bad_row(tmp_path))
    elif case == "no_columns":
        (tmp_path / "x.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
        data = str(tmp_path / "x.jsonl")
    elif case == "bad_extract":
        extra = ["extract=fuzzy"]
    else:
        extra = ["temperature=0.7"]
    code = evaluate_main(["--model", model_dir, "--data", data, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in named:
        assert part in lines[0], (part, lines[0])
