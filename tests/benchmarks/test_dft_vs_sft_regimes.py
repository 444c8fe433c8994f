"""What each regime of benchmarks/dft_vs_sft.py runs, read from the commands it would start (a
recording runner; nothing is trained): the paper regime pre-trains on the generic corpus as plain
documents, samples with the paper's raw prompt and fine-tunes under alpaca; sft-base keeps the first
version's setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import dft_vs_sft
from benchmarks.dft_vs_sft import Benchmark, StageError, protocol_for

pytestmark = pytest.mark.slow  # each test builds the task's tokenizer (about 7 s)


class RecordingRunner:
    def __init__(self) -> None:
        self.commands: list[tuple[str, str, tuple[str, ...]]] = []

    def script(self, name: str, script: str, *args: str, **_: object) -> float:
        self.commands.append((name, script, args))
        return 0.0


def _benchmark(tmp_path: Path, regime: str) -> tuple[Benchmark, RecordingRunner]:
    bench = Benchmark(tmp_path, protocol_for(regime, quick=True), threads=1)
    bench.run = RecordingRunner()
    return bench, bench.run


def _base_command(bench: Benchmark, runner: RecordingRunner) -> tuple[str, ...]:
    bench.make_data()
    with pytest.raises(StageError, match="no checkpoint"):  # nothing was trained
        bench.base()
    [(name, script, args)] = runner.commands
    assert (name, script) == ("base-train", "train_dft.py")
    return args


def test_the_paper_regime_pretrains_on_documents_and_fine_tunes_under_alpaca(tmp_path) -> None:
    bench, runner = _benchmark(tmp_path, "paper")
    args = _base_command(bench, runner)
    assert f"data.path={tmp_path / 'data' / 'corpus.jsonl'}" in args
    assert "dft.objective=sft" in args and "tokenizer.chat_template=null" in args
    # the later tokenizer.path wins: the copy whose template renders a row as a plain document
    paths = [a for a in args if a.startswith("tokenizer.path=")]
    assert paths[-1] == f"tokenizer.path={tmp_path / 'document-tokenizer'}"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "document-tokenizer"))
    row = [{"role": "user", "content": ""}, {"role": "assistant", "content": "Ann has 3 pens."}]
    assert tokenizer.apply_chat_template(row, tokenize=False) == "</s>Ann has 3 pens.</s>"
    assert "tokenizer.chat_template=alpaca" in bench._common()

    bench.generate("neg", tmp_path / "base-hf", tmp_path / "data" / "finetune.jsonl", tmp_path / "neg", 2, 1)
    shard = runner.commands[1][2]
    config = Path(shard[shard.index("--config") + 1]).read_text()
    assert json.loads(config) == {"prompt": {"style": "template", "template": dft_vs_sft.PAPER_GENERATION_PROMPT}}
    assert "sampling.top_p=1.0" in shard and "sampling.temperature=0.7" in shard and "sampling.top_k=50" in shard


def test_the_sft_base_regime_keeps_the_first_versions_setup(tmp_path) -> None:
    bench, runner = _benchmark(tmp_path, "sft-base")
    args = _base_command(bench, runner)
    assert f"data.path={tmp_path / 'data' / 'pretrain.jsonl'}" in args
    assert not (tmp_path / "data" / "corpus.jsonl").exists()
    assert not any(a.startswith("tokenizer.chat_template") for a in bench._common())
    bench.generate("neg", tmp_path / "base-hf", tmp_path / "data" / "finetune.jsonl", tmp_path / "neg", 2, 1)
    shard = runner.commands[1][2]
    assert "--config" not in shard and "prompt.system_message=null" in shard


def test_dft_filtered_trains_on_the_filtered_negatives(tmp_path) -> None:
    bench, runner = _benchmark(tmp_path, "paper")
    negatives = {"finetune": tmp_path / "all.parquet", "finetune_filtered": tmp_path / "filtered.parquet"}
    for method in ("dft", "dft_filtered"):
        with pytest.raises(StageError):
            bench.finetune(method, 1e-3, 0, tmp_path / "base", negatives)
    (_, _, dft), (_, _, filtered) = runner.commands
    assert f"data.path={negatives['finetune']}" in dft
    assert f"data.path={negatives['finetune_filtered']}" in filtered
    assert [a for a in dft if a.startswith("dft.")] == [a for a in filtered if a.startswith("dft.")]
