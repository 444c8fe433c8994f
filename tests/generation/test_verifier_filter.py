"""filter.exclude_correct: only incorrect negatives are kept, first in seed order, and the rest is
counted; checked on the HF backend against samples drawn here independently, with references
rigged so that known samples are "correct"."""

from __future__ import annotations

import json

import pytest
from generation_testutils import reference_seed, write_jsonl

from nemo_dft.data.io import read_rows
from nemo_dft.generation.backends import Request, build_backend
from nemo_dft.generation.fields import extract_examples
from nemo_dft.generation.merge import merge_shards
from nemo_dft.generation.prompts import encode_prompt, render_prompt
from nemo_dft.generation.runner import run_generation
from nemo_dft.generation.samples import clean_sample, stop_token_ids

N = 3


def _samples(cfg, tokenizer, rows, round_index: int) -> dict:
    """Every prompt's N samples of one round, drawn here with the documented seed rule."""
    examples = extract_examples(rows, cfg.data.format, "test")
    stop_ids = stop_token_ids(cfg.model.path, None, tokenizer)
    backend = build_backend(cfg, tokenizer, stop_ids)
    try:
        requests = [Request(encode_prompt(render_prompt(ex, cfg.prompt, tokenizer), tokenizer, cfg.prompt.add_bos),
                            N, reference_seed(int(cfg.sampling.seed), ex.id, round_index)) for ex in examples]
        out = backend.generate(requests)
    finally:
        backend.close()
    return {ex.id: [clean_sample(ids, tokenizer, stop_ids)[0] for ids in samples]
            for ex, samples in zip(examples, out, strict=True)}


@pytest.fixture
def rigged(make_cfg, tmp_path, tiny_tokenizer):
    """An input whose even rows' reference is their own first sample (so exactly that sample is
    correct under extract=exact), and every prompt's samples of rounds 0 and 1."""
    cfg = make_cfg("plain", **{"sampling.n": N})
    run_generation(cfg)
    plain = read_rows(tmp_path / "plain" / "negatives.parquet")
    rows = []
    for i, row in enumerate(plain):
        own_sample = {"role": "assistant", "content": row["generated_0"][-1]["content"]}
        real = row["real"] if i % 2 else [row["real"][0], own_sample]
        rows.append({"id": row["id"], "messages": real})
    data = write_jsonl(tmp_path / "rigged.jsonl", rows)
    rounds = [_samples(cfg, tiny_tokenizer, rows, r) for r in (0, 1)]
    return data, rows, rounds


def _filtered(make_cfg, data, out, **overrides):
    settings = {"sampling.n": N, "data.input": str(data), "filter.exclude_correct": True, "filter.extract": "exact",
                "shard.count": 2, **overrides}
    cfg = make_cfg(out, **settings)
    report = run_generation(cfg)
    return cfg, report, read_rows(cfg.output.dir + "/negatives.parquet")


def _texts(row) -> list[str]:
    return [row[f"generated_{k}"][-1]["content"] for k in range(N)]


def test_correct_samples_are_replaced_by_the_next_rounds_in_seed_order(make_cfg, rigged) -> None:
    data, rows, (first, second) = rigged
    assert all(len(set(s)) == N for s in first.values()), "the rigging needs distinct samples"
    _, report, out = _filtered(make_cfg, data, "one-round", **{"sampling.max_resample_rounds": 1})
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for i, row in enumerate(out):
        ident = row["id"]
        if i % 2:
            expected = first[ident]
        else:  # the first sample equals the reference: the second round's first sample takes its place
            expected = [*first[ident][1:], second[ident][0]]
        assert _texts(row) == expected, ident
    counts = report.merged.counts
    evens = (len(rows) + 1) // 2
    assert counts["filtered_correct"] == evens
    assert counts["filter_rounds"] == 2 and counts["prompts_short"] == 0 and counts["prompts_dropped"] == 0
    assert counts["samples"] == len(rows) * N + evens * N


def test_a_short_prompt_is_dropped_and_listed_or_kept_with_its_correct_samples(make_cfg, rigged, tmp_path) -> None:
    data, rows, (first, _) = rigged
    _, report, dropped = _filtered(make_cfg, data, "drop", **{"sampling.max_resample_rounds": 0})
    evens = [r["id"] for i, r in enumerate(rows) if i % 2 == 0]
    assert [r["id"] for r in dropped] == [r["id"] for i, r in enumerate(rows) if i % 2]
    assert report.merged.counts["prompts_dropped"] == report.merged.counts["prompts_short"] == len(evens)
    meta = json.loads(__import__("pyarrow.parquet", fromlist=["x"]).read_schema(
        tmp_path / "drop" / "negatives.parquet").metadata[b"nemo_dft.generation"])
    assert sorted(meta["dropped_ids"]) == sorted(evens)
    assert merge_shards(tmp_path / "drop", 2).num_rows == len(rows) - len(evens)  # a re-merge passes its checks

    _, report, kept = _filtered(make_cfg, data, "keep", **{"sampling.max_resample_rounds": 0,
                                                            "filter.on_short": "keep"})
    assert len(kept) == len(rows) and report.merged.counts["prompts_short"] == len(evens)
    for i, row in enumerate(kept):
        samples = first[row["id"]]
        assert _texts(row) == (samples if i % 2 else [*samples[1:], samples[0]])  # incorrect first, then correct


def test_filter_settings_are_checked_and_change_the_fingerprint(make_cfg) -> None:
    from nemo_dft.config.loading import ConfigError
    from nemo_dft.generation.config import fingerprint, validate_for_generation

    with pytest.raises(ConfigError, match="filter.extract"):
        validate_for_generation(make_cfg(**{"filter.extract": "last_word"}))
    with pytest.raises(ConfigError, match="filter.on_short"):
        validate_for_generation(make_cfg(**{"filter.on_short": "skip"}))
    off, on = make_cfg(), make_cfg(**{"filter.exclude_correct": True})
    assert fingerprint(off) == fingerprint(make_cfg(**{"filter.extract": "number"}))  # off: as before the filter
    assert fingerprint(off) != fingerprint(on)
