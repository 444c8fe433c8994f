"""A rerun of a ``run.dir`` against the configuration it was started with (``config.yaml``).

What a checkpoint continues cannot change mid-run: the data, the tokenizer, the model and its
initial weights, the DFT objective, the optimizer and its schedule, the seed and the global batch.
How the run is executed may change: the trainer (devices, max_steps, evaluation interval, signals,
the NaN policy, progress bar), checkpoint frequency, the number of epochs (to train longer), and
the parallel layout and micro-batch size (which do not change the math).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.loading import ConfigError

MUTABLE = (
    "run.dir",
    "trainer.",
    "checkpoint.",
    "peft.checkpoint",  # what later checkpoints hold; a resume reads either kind
    "model.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size",
    "model.context_parallel_size",
    "model.micro_batch_size",
    "data.num_epochs",  # more epochs extend the run; earlier epochs' order does not depend on it
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def is_mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE)


FREE_FORM = "model.config"  # a dict of GPT config overrides: a key on one side only is a change


def changed_keys(saved: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ.  Schema keys one side lacks (settings added since) are left out;
    in the free-form ``model.config`` a key set on one side only counts as changed."""
    old = _flatten(OmegaConf.to_container(saved, resolve=True))
    now = _flatten(OmegaConf.to_container(new, resolve=True))
    free = {k for k in old.keys() | now.keys() if k.startswith(FREE_FORM)}
    keys = (old.keys() & now.keys()) - free
    changes = {k: (old[k], now[k]) for k in keys if old[k] != now[k]}
    free_old = {k: v for k, v in old.items() if k in free and v != {}}
    free_now = {k: v for k, v in now.items() if k in free and v != {}}
    for key in free_old.keys() | free_now.keys():
        if free_old.get(key) != free_now.get(key):
            changes[key] = (free_old.get(key), free_now.get(key))
    return dict(sorted(changes.items()))


def check_rerun(saved_path: Path, cfg: DictConfig) -> list[str]:
    """Refuse (ConfigError naming the keys) a change that a resumed run cannot take; return the
    accepted changes as ``key: old -> new`` lines to log."""
    try:
        saved = OmegaConf.load(saved_path)
    except Exception as err:  # a damaged file is reported, never silently replaced
        raise ConfigError(f"{saved_path}: unreadable ({err}); restore it or use a new run.dir") from err
    changes = changed_keys(saved, cfg)
    refused = {k: v for k, v in changes.items() if not is_mutable(k)}
    if refused:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in refused.items())
        raise ConfigError(
            f"{saved_path}: this run.dir resumes a run whose settings cannot change mid-run: {listed}; "
            "keep them, or start a new run.dir"
        )
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
