"""HF backend on the tiny random Llama: layout, seeds, sharding, atomic shards, resume and merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from generation_testutils import REPO, reference_seed, task_rows

from nemo_dft.data.io import read_rows
from nemo_dft.data.rows import validate_dft_rows
from nemo_dft.generation.backends import Request, build_backend
from nemo_dft.generation.merge import MergeError, merge_shards
from nemo_dft.generation.runner import GenerationError, run_generation
from nemo_dft.generation.samples import stop_token_ids
from nemo_dft.generation.shards import METADATA_KEY, read_metadata, shard_path, write_shard

K = 3


def _merged(out: Path) -> list[dict]:
    return read_rows(out / "negatives.parquet")


def test_output_layout_metadata_and_trainer_reader(make_cfg, tmp_path) -> None:
    report = run_generation(make_cfg(**{"shard.count": 2}))
    assert report.merged is not None and report.merged.path == tmp_path / "out/negatives.parquet"
    rows = _merged(tmp_path / "out")
    tasks = task_rows(7)
    assert [r["id"] for r in rows] == [t["id"] for t in tasks]
    for row, task in zip(rows, tasks, strict=True):
        assert set(row) == {"id", "real", *(f"generated_{k}" for k in range(K))}
        user = {"role": "user", "content": task["q"]}
        assert row["real"] == [user, {"role": "assistant", "content": task["a"]}]
        for k in range(K):
            chat = row[f"generated_{k}"]
            assert chat[0] == user and chat[1]["role"] == "assistant" and len(chat) == 2
            assert chat[1]["content"] and chat[1]["content"] == chat[1]["content"].lstrip()
            assert "</s>" not in chat[1]["content"]
        assert len({row[f"generated_{k}"][1]["content"] for k in range(K)}) == K
    validate_dft_rows(rows, "negatives.parquet", min_negatives=K)  # the trainer's reader

    meta = read_metadata(tmp_path / "out/negatives.parquet")
    sampling = meta["settings"]["sampling"]
    assert (sampling["n"], sampling["temperature"], sampling["top_p"], sampling["top_k"]) == (K, 0.7, 1.0, 50)
    assert sampling["max_new_tokens"] == 12 and meta["settings"]["backend"] == "hf"
    assert meta["settings"]["prompt"]["system_message"] == "You are an unhelpful assistant."
    assert meta["seeds"] == [[t["id"], reference_seed(0, t["id"])] for t in tasks]
    assert meta["counts"]["prompts"] == 7 and meta["counts"]["samples"] == 7 * K
    assert meta["num_rows"] == 7 and meta["shard_count"] == 2


def test_samples_equal_an_independent_hf_generate(make_cfg, tmp_path, tiny_model) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_generation(make_cfg())
    rows = {r["id"]: r for r in _merged(tmp_path / "out")}
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    for task in task_rows(7)[::3]:
        text = f"<|system|>\nYou are an unhelpful assistant.</s>\n<|user|>\n{task['q']}</s>\n<|assistant|>\n"
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])  # BOS as training
        torch.manual_seed(reference_seed(0, task["id"]))
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=1.0, top_k=50,
            max_new_tokens=12, num_return_sequences=K, eos_token_id=2, pad_token_id=2,
        )  # fmt: skip
        for k, sample in enumerate(out[:, ids.shape[1] :].tolist()):
            cut = sample.index(2) if 2 in sample else len(sample)
            expected = tok.decode(sample[:cut], skip_special_tokens=True).lstrip()
            assert rows[task["id"]][f"generated_{k}"][1]["content"] == expected


def test_same_seed_same_text_other_seed_other_text(make_cfg, tmp_path) -> None:
    run_generation(make_cfg("a"))
    run_generation(make_cfg("b"))
    run_generation(make_cfg("c", **{"sampling.seed": 1}))
    a, b, c = (_merged(tmp_path / name) for name in "abc")
    assert a == b
    assert all(
        ra[f"generated_{k}"] != rc[f"generated_{k}"] for ra, rc in zip(a, c, strict=True) for k in range(K)
    )


def test_sharded_run_equals_unsharded_run(make_cfg, tmp_path) -> None:
    run_generation(make_cfg("one"))
    for index in (2, 0, 1):  # separate processes in practice, in any order
        run_generation(make_cfg("three", **{"shard.count": 3, "shard.index": index}))
    assert merge_shards(tmp_path / "three", 3).num_rows == 7
    assert [len(read_rows(shard_path(tmp_path / "three", i, 3))) for i in range(3)] == [2, 2, 3]
    assert _merged(tmp_path / "one") == _merged(tmp_path / "three")


def _shard_files(out: Path) -> list[str]:
    return sorted(os.listdir(out / "shards")) if (out / "shards").exists() else []


def test_shard_files_are_atomic_and_a_crash_keeps_finished_shards(make_cfg, tmp_path, monkeypatch) -> None:
    cfg = make_cfg(**{"shard.count": 2})
    real_write = pq.write_table

    def write_half_then_die(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        run_generation(cfg)
    assert _shard_files(tmp_path / "out") == []  # neither the final name nor a temporary file remains
    monkeypatch.undo()

    class DiesOnFifthPrompt:
        """The HF backend, preempted while generating shard 1."""

        def __init__(self) -> None:
            self.inner = build_backend(cfg, tok, stop_token_ids(cfg.model.path, None, tok))
            self.name, self.batch_size, self.calls = "hf", 1, 0

        def generate(self, requests: list[Request]):
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError("preempted")
            return self.inner.generate(requests)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    with pytest.raises(RuntimeError, match="preempted"):
        run_generation(cfg, backend=DiesOnFifthPrompt(), tokenizer=tok)
    assert _shard_files(tmp_path / "out") == ["shard-00000-of-00002.parquet"]
    assert len(read_rows(shard_path(tmp_path / "out", 0, 2))) == 3
    run_generation(cfg)
    run_generation(make_cfg("ref"))
    assert _merged(tmp_path / "out") == _merged(tmp_path / "ref")


def test_resume_skips_finished_shards(make_cfg, tmp_path) -> None:
    from transformers import AutoTokenizer

    run_generation(make_cfg(**{"shard.count": 2, "shard.index": 0}))
    first = shard_path(tmp_path / "out", 0, 2)
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    cfg = make_cfg(**{"shard.count": 2})
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    inner = build_backend(cfg, tok, stop_token_ids(cfg.model.path, None, tok))
    seen: list[int] = []

    class Counting:
        name, batch_size = "hf", 1

        def generate(self, requests: list[Request]):
            seen.extend(r.seed for r in requests)
            return inner.generate(requests)

    report = run_generation(cfg, backend=Counting(), tokenizer=tok)
    assert [s.skipped for s in report.shards] == [True, False]
    assert seen == [reference_seed(0, t["id"]) for t in task_rows(7)[3:]]  # only shard 1's prompts
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp
    rerun = run_generation(cfg, backend=None)  # all finished: nothing is loaded or generated
    assert all(s.skipped for s in rerun.shards)


def test_resume_refuses_shards_from_other_settings(make_cfg) -> None:
    run_generation(make_cfg(**{"shard.count": 2, "shard.index": 0}))
    with pytest.raises(GenerationError, match="other settings"):
        run_generation(make_cfg(**{"shard.count": 2, "sampling.temperature": 0.9}))


def test_merge_detects_a_missing_shard(make_cfg, tmp_path) -> None:
    cfg = make_cfg(**{"shard.count": 3, "merge.after_all_shards": False})
    run_generation(cfg)
    shard_path(tmp_path / "out", 1, 3).unlink()
    with pytest.raises(MergeError, match=r"1 of 3 shards missing: indices \[1\]"):
        merge_shards(tmp_path / "out", 3)
    with pytest.raises(MergeError, match="not shards of 4"):
        merge_shards(tmp_path / "out", 4)
    script = str(REPO / "scripts/merge_negatives.py")
    proc = subprocess.run(
        [sys.executable, script, f"output.dir={tmp_path / 'out'}", "shard.count=3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "indices [1]" in proc.stderr
    assert not (tmp_path / "out/negatives.parquet").exists()


def test_merge_detects_duplicate_and_lost_ids(make_cfg, tmp_path) -> None:
    run_generation(make_cfg(**{"shard.count": 2, "merge.after_all_shards": False}))
    out = tmp_path / "out"
    rows0 = read_rows(shard_path(out, 0, 2))
    second = shard_path(out, 1, 2)
    rows1, meta1 = read_rows(second), read_metadata(second)
    write_shard(second, [*rows1, rows0[1]], meta1)
    with pytest.raises(
        MergeError, match=r"shard-00001-of-00002.parquet: row 4: duplicate id 1, also in shard 0"
    ):
        merge_shards(out, 2)
    write_shard(second, rows1[:-1], meta1)
    with pytest.raises(MergeError, match="do not match"):
        merge_shards(out, 2)
    write_shard(second, rows1, meta1)
    assert merge_shards(out, 2).num_rows == 7
    assert METADATA_KEY.encode() in pq.read_schema(out / "negatives.parquet").metadata


class ScriptedBackend:
    """Answers "ok" except for example ids listed in ``empty_rounds`` ({id: rounds that come out empty})."""

    name, batch_size = "fake", 4

    def __init__(self, tokenizer, empty_rounds: dict[int, set[int]]) -> None:
        self.ok = tokenizer("ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.eos = tokenizer.eos_token_id
        self.empty = {reference_seed(0, i, r) for i, rounds in empty_rounds.items() for r in rounds}
        self.requests: list[Request] = []

    def generate(self, requests: list[Request]):
        self.requests.extend(requests)
        return [[[self.eos] if r.seed in self.empty else self.ok for _ in range(r.n)] for r in requests]


def test_empty_samples_are_kept_by_default_as_in_the_paper(make_cfg, tmp_path, tiny_tokenizer) -> None:
    backend = ScriptedBackend(tiny_tokenizer, {4: {0}, 5: {0}})
    report = run_generation(make_cfg(), backend=backend, tokenizer=tiny_tokenizer)
    counts = report.merged.counts
    assert counts["empty_first_pass"] == 2 * K and counts["empty_kept"] == 2 * K and counts["resampled"] == 0
    assert len(backend.requests) == 7  # no second round
    rows = {r["id"]: r for r in _merged(tmp_path / "out")}
    for example_id, row in rows.items():
        expected = "" if example_id in (4, 5) else "ok"
        assert [row[f"generated_{k}"][1]["content"] for k in range(K)] == [expected] * K
    validate_dft_rows(list(rows.values()), "negatives.parquet", min_negatives=K,
                      allow_empty_answers=True)  # the trainer reads them with data.empty_answers=keep


def test_empty_samples_are_resampled_and_counted(make_cfg, tmp_path, tiny_tokenizer) -> None:
    backend = ScriptedBackend(tiny_tokenizer, {4: {0, 1}, 5: {0}})
    report = run_generation(make_cfg(**{"sampling.on_empty": "resample"}), backend=backend, tokenizer=tiny_tokenizer)
    counts = report.merged.counts
    assert counts["empty_first_pass"] == 2 * K and counts["resampled"] == 3 * K
    assert counts["resample_rounds"] == 2
    assert [(r.n, r.seed) for r in backend.requests[7:]] == [
        (K, reference_seed(0, 4, 1)), (K, reference_seed(0, 5, 1)), (K, reference_seed(0, 4, 2)),
    ]  # fmt: skip
    rows = _merged(tmp_path / "out")
    assert all(row[f"generated_{k}"][1]["content"] == "ok" for row in rows for k in range(K))
    assert read_metadata(tmp_path / "out/negatives.parquet")["counts"] == counts


def test_empty_samples_fail_under_fail_policy_or_when_rounds_run_out(
    make_cfg, tmp_path, tiny_tokenizer
) -> None:
    cfg = make_cfg(**{"sampling.on_empty": "fail"})
    with pytest.raises(GenerationError, match=r"3 empty samples \(ids \[5\]"):
        run_generation(cfg, backend=ScriptedBackend(tiny_tokenizer, {5: {0}}), tokenizer=tiny_tokenizer)
    cfg = make_cfg(**{"sampling.on_empty": "resample", "sampling.max_resample_rounds": 2})
    with pytest.raises(GenerationError, match=r"still empty after 2 resample rounds \(ids \[6\]"):
        run_generation(cfg, backend=ScriptedBackend(tiny_tokenizer, {6: {0, 1, 2}}), tokenizer=tiny_tokenizer)
    assert _shard_files(tmp_path / "out") == []


def test_merge_script_reads_the_shard_count_from_the_shard_names(make_cfg, tmp_path) -> None:
    from nemo_dft.generation.merge import count_from_names

    run_generation(make_cfg(**{"shard.count": 2, "merge.after_all_shards": False}))
    out = tmp_path / "out"
    assert _shard_files(out) == ["shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"]
    assert count_from_names(out) == 2
    merged = tmp_path / "merged.parquet"
    command = [sys.executable, str(REPO / "scripts" / "merge_negatives.py"), f"output.dir={out}",
               f"merge.output={merged}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merge_shards(out, 2, tmp_path / "by_count.parquet")
    assert read_rows(merged) == read_rows(tmp_path / "by_count.parquet") and len(read_rows(merged)) == 7
    # names that disagree carry no count: the merge refuses them, naming the stray file
    write_shard(shard_path(out, 0, 3), read_rows(merged)[:1], {})
    assert count_from_names(out) is None
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "shard-00000-of-00003.parquet" in proc.stderr


@pytest.fixture(scope="module")
def templateless_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny Llama with a tokenizer that has no chat template, as Mistral-7B-v0.1 ships."""
    import json
    import shutil

    from transformers import AutoTokenizer

    target = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_model, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(str(target)).chat_template is None
    return target


@pytest.mark.slow
def test_script_on_a_model_without_chat_template_uses_the_zephyr_prompt(make_cfg, tmp_path, templateless_model) -> None:
    """generate_negatives.py, prompt.style=chat: the log names the fallback, and the samples are those
    of an independent HF generate from the literal zephyr prompt text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg()
    out = tmp_path / "base-out"
    args = ["backend=hf", f"model.path={templateless_model}", f"data.input={cfg.data.input}", "data.limit=3",
            "data.format.id_field=id", f"output.dir={out}", "sampling.n=2", "sampling.max_new_tokens=8",
            "shard.index=null", "hf.num_threads=1", "prompt.style=chat"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts/generate_negatives.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no chat template: prompts use prompt.fallback_template (zephyr)" in proc.stdout
    rows = {r["id"]: r for r in _merged(out)}
    tok = AutoTokenizer.from_pretrained(str(templateless_model))
    model = AutoModelForCausalLM.from_pretrained(str(templateless_model)).eval()
    for task in task_rows(3):
        text = f"<|system|>\nYou are an unhelpful assistant.</s>\n<|user|>\n{task['q']}</s>\n<|assistant|>\n"
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])  # BOS as training
        torch.manual_seed(reference_seed(0, task["id"]))
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=1.0, top_k=50,
            max_new_tokens=8, num_return_sequences=2, eos_token_id=2, pad_token_id=2,
        )  # fmt: skip
        for k, sample in enumerate(generated[:, ids.shape[1] :].tolist()):
            cut = sample.index(2) if 2 in sample else len(sample)
            expected = tok.decode(sample[:cut], skip_special_tokens=True).lstrip()
            assert rows[task["id"]][f"generated_{k}"][1]["content"] == expected


def test_more_shards_than_examples_is_refused_before_generating(make_cfg, tmp_path) -> None:
    with pytest.raises(GenerationError, match=r"^shard.count: 9 shards for 7 examples .* use shard.count <= 7"):
        run_generation(make_cfg(**{"shard.count": 9}))
    assert not (tmp_path / "out").exists() or _shard_files(tmp_path / "out") == []
