"""A generation run: read the input, skip finished shards, generate and write the others.

Failure policy: a backend exception aborts the current shard before anything is written (a rerun
resumes there); an empty sample is counted and, under ``sampling.on_empty=keep`` (the paper's),
kept as a negative; under ``resample`` drawn again with a seed of the next round, up to
``sampling.max_resample_rounds``; under ``fail`` (or when the rounds run out) the run stops with
the counts.  No sample is silently dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nemo_dft.data.chat_template import NAMED_CHAT_TEMPLATES
from nemo_dft.data.io import DataFormatError, read_rows
from nemo_dft.generation.backends import Backend, Request, build_backend
from nemo_dft.generation.config import fingerprint, settings, validate_for_generation
from nemo_dft.generation.fields import Example, extract_examples
from nemo_dft.generation.merge import MergeReport, merge_shards
from nemo_dft.generation.prompts import chat_template, encode_prompt, render_prompt
from nemo_dft.generation.samples import clean_sample, generated_length, is_empty, stop_token_ids
from nemo_dft.generation.seeds import SEED_RULE, example_seed
from nemo_dft.generation.shards import (
    FORMAT_VERSION,
    ids_digest,
    read_metadata,
    shard_bounds,
    shard_path,
    write_shard,
)
from nemo_dft.generation.verifier_filter import PromptPool, add_sample, select


class GenerationError(RuntimeError):
    """Generation could not produce a complete shard; the message gives the counts."""


@dataclass
class ShardResult:
    index: int
    path: Path
    skipped: bool
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunReport:
    shards: list[ShardResult]
    merged: MergeReport | None = None


def _log(message: str) -> None:
    print(f"[generate_negatives] {message}", flush=True)


def load_input(data_cfg: Any) -> tuple[list[dict[str, Any]], str]:
    """Rows of ``data.input`` (local file/dir via read_rows, else a hub dataset id) and its name."""
    source = str(data_cfg.input)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        rows = read_rows(path)
    else:  # "org/name": a hub dataset, where a hub is reachable
        try:
            import datasets

            rows = datasets.load_dataset(source, split=data_cfg.split).to_list()
        except Exception as err:  # network, auth, unknown split: report with the id
            raise DataFormatError(
                f"{source}: not a local path, and loading it from the hub failed: {err}"
            ) from err
        source = f"{source}[{data_cfg.split}]"
    if data_cfg.limit is not None:
        rows = rows[: data_cfg.limit]
    return rows, source


def _sample_all(
    backend: Backend,
    examples: list[Example],
    prompts: list[list[int]],
    slots: list[list[int]],
    base_seed: int,
    round_index: int,
    desc: str,
) -> list[list[list[int]]]:
    """Token ids for the requested sample slots of each example (``slots[i]`` lists them)."""
    from tqdm.auto import tqdm

    wanted = [i for i, s in enumerate(slots) if s]
    results: list[list[list[int]]] = [[] for _ in examples]
    with tqdm(total=len(wanted), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(wanted), backend.batch_size):
            chunk = wanted[start : start + backend.batch_size]
            requests = [
                Request(prompts[i], len(slots[i]), example_seed(base_seed, examples[i].id, round_index))
                for i in chunk
            ]
            for i, samples in zip(chunk, backend.generate(requests), strict=True):
                if len(samples) != len(slots[i]):
                    raise GenerationError(
                        f"example id={examples[i].id!r}: asked for {len(slots[i])} samples, "
                        f"the backend returned {len(samples)}"
                    )
                results[i] = samples
            bar.update(len(chunk))
    return results


def generate_shard(
    cfg: DictConfig, examples: list[Example], tokenizer: Any, stop_ids: set[int], backend: Backend, desc: str
) -> tuple[list[dict[str, Any]], dict[str, int], list[list[Any]]]:
    """Rows in the 1-to-m layout, the counts, and the (id, seed) pairs of one shard."""
    k_total, base_seed = int(cfg.sampling.n), int(cfg.sampling.seed)
    prompts = [encode_prompt(render_prompt(ex, cfg.prompt, tokenizer), tokenizer, cfg.prompt.add_bos)
               for ex in examples]
    texts: list[list[str]] = [[""] * k_total for _ in examples]
    slots = [list(range(k_total)) for _ in examples]
    counts = {
        "prompts": len(examples),
        "samples": len(examples) * k_total,
        "generated_tokens": 0,
        "length_capped": 0,
        "empty_first_pass": 0,
        "empty_kept": 0,
        "resampled": 0,
        "resample_rounds": 0,
    }
    if cfg.filter.exclude_correct:
        kept, dropped = _filtered_texts(cfg, examples, prompts, tokenizer, stop_ids, backend, desc, counts)
        examples = [ex for ex in examples if ex.id not in dropped]
        texts = [kept[ex.id] for ex in examples]
        return _rows(examples, texts), counts, [[ex.id, example_seed(base_seed, ex.id)] for ex in examples]
    for round_index in range(int(cfg.sampling.max_resample_rounds) + 1):
        label = desc if round_index == 0 else f"{desc} resample {round_index}"
        token_lists = _sample_all(backend, examples, prompts, slots, base_seed, round_index, label)
        still_empty: list[list[int]] = [[] for _ in examples]
        for i, samples in enumerate(token_lists):
            for slot, ids in zip(slots[i], samples, strict=True):
                text, stopped = clean_sample(ids, tokenizer, stop_ids)
                counts["generated_tokens"] += generated_length(ids, stop_ids)
                counts["length_capped"] += int(not stopped)
                texts[i][slot] = text
                if is_empty(text):
                    still_empty[i].append(slot)
        num_empty = sum(len(s) for s in still_empty)
        if round_index == 0:
            counts["empty_first_pass"] = num_empty
        if num_empty == 0:
            break
        bad_ids = [examples[i].id for i, s in enumerate(still_empty) if s][:10]
        if cfg.sampling.on_empty == "keep":
            counts["empty_kept"] = num_empty
            _log(f"{desc}: {num_empty} empty samples (ids {bad_ids} ...) kept as negatives (sampling.on_empty=keep)")
            break
        if cfg.sampling.on_empty == "fail":
            raise GenerationError(
                f"{desc}: {num_empty} empty samples (ids {bad_ids} ...) and sampling.on_empty=fail"
            )
        if round_index == int(cfg.sampling.max_resample_rounds):
            raise GenerationError(
                f"{desc}: {num_empty} samples still empty after {round_index} resample rounds "
                f"(ids {bad_ids} ...); raise sampling.max_resample_rounds or check the model and prompt"
            )
        _log(f"{desc}: {num_empty} empty samples, resampling them (round {round_index + 1})")
        counts["resampled"] += num_empty
        counts["resample_rounds"] = round_index + 1
        slots = still_empty
    seeds = [[ex.id, example_seed(base_seed, ex.id)] for ex in examples]
    return _rows(examples, texts), counts, seeds


def _rows(examples: list[Example], texts: list[list[str]]) -> list[dict[str, Any]]:
    rows = []
    for ex, samples in zip(examples, texts, strict=True):
        row: dict[str, Any] = {"id": ex.id, "real": ex.real}
        for k, text in enumerate(samples):
            row[f"generated_{k}"] = [*ex.prompt, {"role": "assistant", "content": text}]
        rows.append(row)
    return rows


def _filtered_texts(
    cfg: DictConfig,
    examples: list[Example],
    prompts: list[list[int]],
    tokenizer: Any,
    stop_ids: set[int],
    backend: Backend,
    desc: str,
    counts: dict[str, int],
) -> tuple[dict[Any, list[str]], set[Any]]:
    """Each kept prompt's ``sampling.n`` negatives and the ids of the prompts dropped, under
    ``filter.exclude_correct`` (the rounds and policies of :mod:`verifier_filter`)."""
    n, base_seed, rounds = int(cfg.sampling.n), int(cfg.sampling.seed), int(cfg.sampling.max_resample_rounds)
    pools = [PromptPool() for _ in examples]
    counts.update(filtered_correct=0, filter_rounds=0, prompts_short=0, prompts_dropped=0, empty_discarded=0)
    for round_index in range(rounds + 1):
        slots = [list(range(n)) if pool.short(n) else [] for pool in pools]
        if not any(slots):
            break
        if round_index:
            counts["samples"] += sum(len(s) for s in slots)
            _log(f"{desc}: {sum(1 for s in slots if s)} prompts have fewer than {n} incorrect samples; "
                 f"sampling {n} more for each (round {round_index})")
        label = desc if round_index == 0 else f"{desc} filter round {round_index}"
        token_lists = _sample_all(backend, examples, prompts, slots, base_seed, round_index, label)
        counts["filter_rounds"] = round_index + 1
        for ex, pool, samples in zip(examples, pools, token_lists, strict=True):
            for ids in samples:
                text, stopped = clean_sample(ids, tokenizer, stop_ids)
                counts["generated_tokens"] += generated_length(ids, stop_ids)
                counts["length_capped"] += int(not stopped)
                if is_empty(text):
                    counts["empty_first_pass" if round_index == 0 else "resampled"] += 1
                    if cfg.sampling.on_empty == "fail":
                        raise GenerationError(f"{desc}: an empty sample (id {ex.id!r}) and sampling.on_empty=fail")
                    if cfg.sampling.on_empty == "resample":
                        counts["empty_discarded"] += 1
                        continue
                    counts["empty_kept"] += 1
                counts["filtered_correct"] += int(add_sample(pool, text, ex.answer, cfg.filter.extract))
    kept: dict[Any, list[str]] = {}
    dropped: set[Any] = set()
    for ex, pool in zip(examples, pools, strict=True):
        counts["prompts_short"] += int(pool.short(n))
        chosen = select(pool, n, cfg.filter.on_short)
        if chosen is None:
            dropped.add(ex.id)
        else:
            kept[ex.id] = chosen
    counts["prompts_dropped"] = len(dropped)
    if counts["prompts_short"]:
        shown = sorted(str(ex.id) for ex, pool in zip(examples, pools, strict=True) if pool.short(n))[:10]
        action = "dropped" if cfg.filter.on_short == "drop" else "kept with correct samples"
        _log(f"{desc}: {counts['prompts_short']} prompts have fewer than {n} incorrect samples after "
             f"{counts['filter_rounds']} rounds (ids {shown} ...): {action} (filter.on_short={cfg.filter.on_short})")
    return kept, dropped


def _log_prompt_template(cfg: DictConfig, tokenizer: Any) -> None:
    """Say so when chat prompts use ``prompt.fallback_template`` (the tokenizer has no template)."""
    if cfg.prompt.style != "chat":
        return
    _, fell_back = chat_template(cfg.prompt, tokenizer)
    if fell_back:
        name = cfg.prompt.fallback_template
        shown = name if name in NAMED_CHAT_TEMPLATES else "the Jinja template given"
        _log(
            f"the tokenizer of {cfg.model.path} has no chat template: prompts use "
            f"prompt.fallback_template ({shown}), as the paper's generator does"
        )


def _finished(path: Path, expected_fingerprint: str) -> bool:
    if not path.exists():
        return False
    meta = read_metadata(path)
    if meta.get("fingerprint") != expected_fingerprint:
        raise GenerationError(
            f"{path}: finished shard from a run with other settings (fingerprint {meta.get('fingerprint')}, "
            f"now {expected_fingerprint}); use another output.dir or delete the shards to regenerate"
        )
    return True


def run_generation(cfg: DictConfig, backend: Backend | None = None, tokenizer: Any = None) -> RunReport:
    """Generate the shards selected by ``shard.index`` (null: all) and, after all, merge them.

    ``backend``/``tokenizer`` may be injected (tests); otherwise they are built from the config, and
    only when some selected shard is still missing.
    """
    validate_for_generation(cfg)
    out_dir, count = Path(cfg.output.dir), int(cfg.shard.count)
    rows, source = load_input(cfg.data)
    examples = extract_examples(rows, cfg.data.format, source)
    if count > len(examples):
        raise GenerationError(
            f"shard.count: {count} shards for {len(examples)} examples of {source} would leave "
            f"{count - len(examples)} shard(s) empty; use shard.count <= {len(examples)}"
        )
    fp = fingerprint(cfg)
    selected = list(range(count)) if cfg.shard.index is None else [int(cfg.shard.index)]
    results: list[ShardResult] = []
    todo = []
    for index in selected:
        path = shard_path(out_dir, index, count)
        if _finished(path, fp):
            _log(f"shard {index}/{count}: already finished, skipping ({path})")
            results.append(ShardResult(index, path, skipped=True))
        else:
            todo.append(index)
    if todo:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.path), revision=cfg.model.revision)
        _log_prompt_template(cfg, tokenizer)
        stop_ids = stop_token_ids(cfg.model.path, cfg.model.revision, tokenizer)
        owned = backend is None
        if backend is None:
            _log(f"loading {cfg.backend} backend for {cfg.model.path}")
            backend = build_backend(cfg, tokenizer, stop_ids)
        try:
            for index in todo:
                results.append(_run_shard(cfg, examples, source, index, tokenizer, stop_ids, backend, fp))
        finally:
            if owned:
                backend.close()
    report = RunReport(shards=sorted(results, key=lambda r: r.index))
    if cfg.shard.index is None and cfg.merge.after_all_shards:
        report.merged = merge_shards(out_dir, count, cfg.merge.output)
        _log(
            f"merged {report.merged.num_rows} rows x {report.merged.num_negatives} negatives into "
            f"{report.merged.path}; counts {report.merged.counts}"
        )
    return report


def _run_shard(
    cfg: DictConfig,
    examples: list[Example],
    source: str,
    index: int,
    tokenizer: Any,
    stop_ids: set[int],
    backend: Backend,
    fp: str,
) -> ShardResult:
    count = int(cfg.shard.count)
    start, stop = shard_bounds(len(examples), index, count)
    part = examples[start:stop]
    desc = f"shard {index}/{count}"
    began = time.perf_counter()
    rows, counts, seeds = generate_shard(cfg, part, tokenizer, stop_ids, backend, desc)
    seconds = time.perf_counter() - began
    metadata = {
        "format_version": FORMAT_VERSION,
        "generator": "nemo_dft.generation",
        "fingerprint": fp,
        "settings": settings(cfg),
        "input": source,
        "num_input_examples": len(examples),
        "shard": {"index": index, "count": count, "start": start, "stop": stop},
        "ids_sha256": ids_digest([row["id"] for row in rows]),
        "dropped_ids": [ex.id for ex in part if ex.id not in {row["id"] for row in rows}],
        "seed_rule": SEED_RULE,
        "seeds": seeds,
        "counts": counts,
    }
    path = shard_path(cfg.output.dir, index, count)
    write_shard(path, rows, metadata)
    rate = counts["generated_tokens"] / seconds if seconds > 0 else 0.0
    _log(
        f"{desc}: wrote {len(rows)} rows to {path} in {seconds:.1f} s ({rate:.0f} generated tokens/s); "
        f"counts {counts}"
    )
    return ShardResult(index, path, skipped=False, counts=counts, seconds=seconds)
