"""Offline reference log-probs: the scoring pass against an HF forward pass and across TP, training
with the file against training with the frozen on-the-fly reference, fingerprint and missing-id
refusals, and an interrupted pass resumed into the same file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, script_command, subprocess_env

pytestmark = pytest.mark.slow

TASK = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task"
COMMON = ["trainer.progress_bar=false", "data.num_epochs=2", "data.eval_path=null"]
TRAIN = [*COMMON, "trainer.max_steps=4", "model.global_batch_size=8"]


def script(name: str, *args: str, nproc: int = 1) -> list[str]:
    return script_command(f"scripts/{name}", *args, nproc=nproc)


def ok(command: list[str]) -> subprocess.CompletedProcess:
    result = run_child(command)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_scores(path: Path) -> dict[tuple[str, int, str], float]:
    import pyarrow.parquet as pq

    return {(r["id"], r["epoch"], r["column"]): r["logp"] for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, initial_checkpoint):
    root = tmp_path_factory.mktemp("reference")
    init = initial_checkpoint  # the untrained model (lr = 0), shared with other files (tests/conftest.py)
    scored = root / "tp1.parquet"
    ok(script("precompute_ref_logps.py", f"model.init_from={init}", *COMMON, f"output={scored}",
              "model.micro_batch_size=8"))
    return {"root": root, "init": init, "tp1": scored}


def test_scores_match_an_hf_forward_pass(setup):
    """Independent check: export the reference checkpoint to HF and score groups with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dft.convert import export_hf
    from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
    from nemo_dft.data.io import read_rows
    from nemo_dft.data.rows import POSITIVE_COLUMN, negative_column
    from nemo_dft.reference.store import encode_id

    # in this process: scripts/convert_hf.py export is tested as a command in tests/convert/test_convert_cli.py
    hf_dir = export_hf(setup["init"], setup["root"] / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2, shuffle=False)
    groups = DFTGroupDataset(read_rows(TASK / "train.jsonl"), tokenizer, settings, "train.jsonl")
    scores = read_scores(setup["tp1"])
    generator = torch.Generator().manual_seed(int(time.time()))
    for item in torch.randint(len(groups), (12,), generator=generator).tolist():
        group = groups.group(item)
        columns = [POSITIVE_COLUMN] + [negative_column(k) for k in settings.negative_columns(group["epoch"])]
        assert (encode_id(groups.example_ids[group["index"]]), group["epoch"], POSITIVE_COLUMN) not in scores
        for pair, column in zip(group["pairs"][1:], columns[1:], strict=True):  # negatives only are scored
            ids = torch.tensor([pair.prompt + pair.response])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            expected = logps.gather(-1, targets[:, None])[len(pair.prompt) - 1:].sum().item()
            key = (encode_id(groups.example_ids[group["index"]]), group["epoch"], column)
            assert scores[key] == pytest.approx(expected, rel=1e-5, abs=1e-4), key


@pytest.mark.parametrize("layout", [
    ["model.tensor_model_parallel_size=2"], ["model.pipeline_model_parallel_size=2"], ["model.micro_batch_size=4"],
    # packed negatives: one row per micro-batch, and rows of data.pack_length under PP
    ["model.micro_batch_size=4", "data.packing=true"],
    ["model.pipeline_model_parallel_size=2", "data.packing=true", "data.pack_length=384"],
], ids=["tp2", "pp2", "dp2", "dp2_packed", "pp2_packed_rows"])
def test_parallel_layouts_score_alike(setup, layout, tmp_path):
    scored = tmp_path / "scores.parquet"
    ok(script("precompute_ref_logps.py", f"model.init_from={setup['init']}", *COMMON, f"output={scored}",
              "trainer.devices=2", "model.micro_batch_size=8", *layout, nproc=2))
    import pyarrow.parquet as pq

    def token_counts(path: Path) -> dict:
        return {(r["id"], r["epoch"], r["column"]): r["tokens"] for r in pq.read_table(path).to_pylist()}

    assert token_counts(scored) == token_counts(setup["tp1"])
    ours, reference = read_scores(scored), read_scores(setup["tp1"])
    assert ours.keys() == reference.keys() and len(ours) == 512 * 2 * 2
    keys = sorted(reference)
    torch.testing.assert_close(torch.tensor([ours[k] for k in keys]), torch.tensor([reference[k] for k in keys]),
                               rtol=1e-5, atol=1e-5)


def test_offline_training_matches_frozen_reference(shared_runs, initial_checkpoint, initial_reference_scores):
    """Training with the file gives the frozen on-the-fly reference's losses, u, weights, scores and
    grad norms (1e-5).  The frozen run is test_parallel_layouts.py's frozen_tp1_pp1_dp1_mb4 (3 steps of 8
    prompts from the shared initial checkpoint); the offline runs take its settings and the initial
    checkpoint's one-epoch file (tests/conftest.py), each made once per session."""
    from tests.training.test_parallel_layouts import EXTRA, FROZEN, layout_overrides, layout_run

    frozen_run = layout_run(shared_runs, initial_checkpoint, "frozen_tp1_pp1_dp1_mb4")
    assert EXTRA["frozen_tp1_pp1_dp1_mb4"] == FROZEN and "dft.reference=frozen" in FROZEN
    # the frozen run's settings but for the reference
    with_file = [*(x.replace("dft.reference=frozen", "dft.reference=offline") for x in FROZEN),
                 f"dft.ref_logps={initial_reference_scores}"]
    runs = {"offline": shared_runs.get(1, *layout_overrides(1, 1, 1, 4, initial_checkpoint, *with_file)),
            # the offline file also serves pipeline parallelism
            "offline_pp2": shared_runs.get(2, *layout_overrides(1, 2, 1, 4, initial_checkpoint, *with_file))}
    frozen = metrics(frozen_run)
    assert len(frozen) == 3 and (frozen_run / "reference").exists()
    for run, run_dir in runs.items():
        offline = metrics(run_dir)
        for key in ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "grad_norm"):
            torch.testing.assert_close(torch.tensor([m[key] for m in offline]),
                                       torch.tensor([m[key] for m in frozen]), rtol=1e-5, atol=1e-5,
                                       msg=f"{run}: {key}")
        assert not (run_dir / "reference").exists()  # no frozen copy was made


def test_interrupted_pass_resumes_into_the_same_file(setup, tmp_path):
    """Killed, then its rerun stopped by the scheduler's signal (exit 75, shards flushed): each rerun
    resumes from the shards of the attempts before it, and the last one completes the same file.
    (One chain of three starts instead of a kill and a stop of fresh passes, each rerun to the end.)"""
    import pyarrow.parquet as pq

    output = tmp_path / "resumed.parquet"
    command = script("precompute_ref_logps.py", f"model.init_from={setup['init']}", *COMMON, f"output={output}",
                     "model.micro_batch_size=8", "groups_per_shard=64")
    partial = output.with_name(output.name + ".partial")

    def shards() -> set[str]:
        return {p.name for p in partial.glob("shard-*.parquet")} if partial.is_dir() else set()

    def groups_in(names: set[str]) -> int:
        return len({(r["id"], r["epoch"]) for name in names for r in pq.read_table(partial / name).to_pylist()})

    def stop_after_a_new_shard(stop: signal.Signals, before: set[str]) -> int:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True, env=subprocess_env())
        deadline = time.time() + 600
        while not shards() - before:
            assert process.poll() is None, "the pass ended before its first shard"
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.05)
        os.killpg(process.pid, stop)
        return process.wait(timeout=300)

    assert stop_after_a_new_shard(signal.SIGKILL, set()) == -signal.SIGKILL
    assert not output.exists()
    killed = shards()
    assert stop_after_a_new_shard(signal.SIGTERM, killed) == 75  # preempted
    assert not output.exists()
    stopped = shards()
    assert killed < stopped  # the killed attempt's shards are kept, the preempted one's added
    resumed = groups_in(stopped)
    assert groups_in(killed) < resumed < 1024
    result = ok(command)
    summary = json.loads(result.stdout.split("reference log-probs: ", 1)[1])
    assert summary["resumed_groups"] == resumed and summary["scored_groups"] == 1024 - resumed
    assert read_scores(output) == read_scores(setup["tp1"])  # bit for bit
    assert not partial.exists()


# ---- refusals ----------------------------------------------------------------------------------


def fingerprint_of(*overrides: str) -> dict[str, str]:
    from nemo_dft.config.training import load_config
    from nemo_dft.modeling.tokenizer import load_tokenizer
    from nemo_dft.reference import fingerprint

    cfg = load_config(None, [*COMMON, *overrides])
    return fingerprint.for_run(cfg, load_tokenizer(cfg).tokenizer)


def tiny_dataset():
    from transformers import AutoTokenizer

    from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
    from nemo_dft.data.io import read_rows
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    return DFTGroupDataset(read_rows(TASK / "train.jsonl"), tokenizer, settings, "train.jsonl")


def test_matching_file_loads(setup):
    from nemo_dft.reference.table import load_reference_table

    table = load_reference_table(setup["tp1"], tiny_dataset(), fingerprint_of(f"model.init_from={setup['init']}"))
    assert table.shape == (512, 2, 2) and torch.isfinite(table).all() and (table < 0).all()


def test_mismatching_file_is_refused_naming_what_differs(setup, tmp_path):
    from nemo_dft.reference.table import load_reference_table

    changed_data = tmp_path / "train.jsonl"
    lines = (TASK / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[7])
    row["real"][-1]["content"] += " x"
    changed_data.write_text("\n".join([*lines[:7], json.dumps(row), *lines[8:]]) + "\n")

    from transformers import AutoTokenizer

    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    other_tokenizer = tmp_path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other_tokenizer)

    other_checkpoint = tmp_path / "checkpoint"
    shutil.copytree(setup["init"], other_checkpoint)
    [shard] = sorted((other_checkpoint / "weights").glob("*.distcp"))[:1]
    with open(shard, "r+b") as handle:  # one changed weight byte is a different checkpoint
        handle.seek(-100, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-100, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))

    init = f"model.init_from={setup['init']}"
    cases = {
        "training data (data.path)": [init, f"data.path={changed_data}"],
        "tokenizer (tokenizer.path)": [init, f"tokenizer.path={other_tokenizer}"],
        "chat template": [init, "tokenizer.chat_template=alpaca"],
        "truncation settings": [init, "data.max_length=48"],
        "truncation settings (data.max_length, data.max_prompt_length, data.add_bos, data.append_eos)":
            [init, "data.append_eos=false"],
        "negative columns": [init, "dft.per_epoch_negatives=false"],
        "reference weights (model.init_from)": [f"model.init_from={other_checkpoint}"],
    }
    for what, overrides in cases.items():
        with pytest.raises(ValueError, match="does not match this run") as error:
            load_reference_table(setup["tp1"], tiny_dataset(), fingerprint_of(*overrides))
        assert what in str(error.value), (what, str(error.value))
        assert str(error.value).count(";") == 0, f"only the {what} should differ: {error.value}"


def test_training_refuses_a_stale_file_at_start(setup, tmp_path):
    changed_data = tmp_path / "train.jsonl"
    changed_data.write_text((TASK / "train.jsonl").read_text() + "\n")  # same rows, different bytes
    result = run_child(script("train_dft.py", f"run.dir={tmp_path / 'run'}", *TRAIN, f"data.path={changed_data}",
                              f"model.init_from={setup['init']}", "dft.reference=offline",
                              f"dft.ref_logps={setup['tp1']}"))
    assert result.returncode == 2
    assert "dft.ref_logps" in result.stderr and "the training data (data.path) has different content" in result.stderr


def test_file_missing_ids_is_refused(setup, tmp_path):
    import pyarrow.parquet as pq

    from nemo_dft.reference.table import load_reference_table

    table = pq.read_table(setup["tp1"])
    rows = [r for r in table.to_pylist() if not (r["id"] == json.dumps(5) and r["epoch"] == 1)]
    assert len(rows) == table.num_rows - 2
    partial = tmp_path / "partial.parquet"
    pq.write_table(pq.read_table(setup["tp1"]).from_pylist(rows, schema=table.schema), partial)
    with pytest.raises(ValueError, match=r'2 reference log-probs this run needs are missing \(id=5 epoch=1'):
        load_reference_table(partial, tiny_dataset(), fingerprint_of(f"model.init_from={setup['init']}"))


def test_a_file_scored_under_the_old_tokenization_rule_is_refused(setup, tmp_path):
    """Files written before the appended EOS and the row-wide truncation carry the old truncation
    component (max_length, max_prompt_length and add_bos only): training must not read them."""
    import hashlib

    import pyarrow.parquet as pq

    from nemo_dft.reference.store import METADATA_KEY
    from nemo_dft.reference.table import load_reference_table

    table = pq.read_table(setup["tp1"])
    metadata = json.loads(table.schema.metadata[METADATA_KEY.encode()])
    old = json.dumps({"max_length": 64, "max_prompt_length": 32, "add_bos": True}, sort_keys=True)
    metadata["fingerprint"]["truncation"] = hashlib.sha256(old.encode()).hexdigest()
    stale = tmp_path / "old_rule.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)}), stale)
    with pytest.raises(ValueError, match="does not match this run: the truncation settings .* or the tokenization "
                                         "rule differ"):
        load_reference_table(stale, tiny_dataset(), fingerprint_of(f"model.init_from={setup['init']}"))


def test_tokens_column_counts_the_paper_trainers_response_tokens(setup, tmp_path):
    """Rows where only a later epoch's negative (or the positive) is long, and an empty negative: the
    scoring pass's ``tokens`` equal the response-token counts of the paper's trainer, recomputed from
    the HF tokenizer (appended EOS, truncation over all four negative columns, in both epochs)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir
    from tests.data.paper_rule import paper_trainer_row

    rows = [json.loads(line) for line in (TASK / "train.jsonl").read_text().splitlines()[:8]]
    long_answer = " ".join("abcdefgh"[i % 8] for i in range(70))
    rows[1]["generated_3"][-1]["content"] = long_answer  # epoch 1's second negative only
    rows[2]["generated_2"][-1]["content"] = long_answer  # epoch 1's first negative only
    rows[3]["real"][-1]["content"] = long_answer
    rows[4]["generated_0"][-1]["content"] = ""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scores.parquet"
    ok(script("precompute_ref_logps.py", f"model.init_from={setup['init']}", *COMMON, f"data.path={data}",
              f"output={scored}", "model.micro_batch_size=8", "data.empty_answers=keep"))
    tokens = {(r["id"], r["epoch"], r["column"]): r["tokens"] for r in pq.read_table(scored).to_pylist()}
    assert len(tokens) == 8 * 2 * 2  # negatives only: no "real" rows
    assert not any(column == "real" for _, _, column in tokens)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    columns = ["real", *(f"generated_{k}" for k in range(4))]
    for row in rows:
        paper = dict(zip(columns, paper_trainer_row(tokenizer, row, columns, 64, 32), strict=True))
        for epoch in (0, 1):
            for column in [f"generated_{2 * epoch}", f"generated_{2 * epoch + 1}"]:
                key = (json.dumps(row["id"]), epoch, column)
                assert tokens[key] == len(paper[column][1]), key
    assert tokens[(json.dumps(rows[1]["id"]), 0, "generated_1")] == len(
        paper_trainer_row(tokenizer, rows[1], ["generated_1"], 64, 32)[0][1])  # short: uncut, EOS appended
