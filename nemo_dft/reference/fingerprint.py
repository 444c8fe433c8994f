"""What a reference log-prob file was computed from, so training can refuse a stale one.

Each component is a sha256 of content, not of paths or timestamps: a copied dataset still
matches, an edited one does not.  Comparing two fingerprints names every component that differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

COMPONENTS = ("dataset", "tokenizer", "template", "truncation", "negatives", "checkpoint")
_CHUNK = 8 << 20


def _hash_files(root: Path, files: list[Path], label: str) -> str:
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"hashing {label}", disable=total < (1 << 30)) as bar:
        for file in files:
            digest.update(str(file.relative_to(root) if file != root else file.name).encode() + b"\0")
            with open(file, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def hash_path(path: str | Path, label: str) -> str:
    """sha256 over a file, or over every file of a directory (relative names included)."""
    path = Path(path)
    if path.is_file():
        return _hash_files(path, [path], label)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{path}: nothing to fingerprint (no files)")
    return _hash_files(path, files, label)


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(hf_tokenizer) -> str:
    """The tokenizer's behaviour: its full serialized model (vocabulary, merges, normalizer...) and
    special tokens, independent of where its files live."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("reference log-probs need a fast (tokenizers-backed) tokenizer to fingerprint")
    specials = {"bos": hf_tokenizer.bos_token, "eos": hf_tokenizer.eos_token, "pad": hf_tokenizer.pad_token}
    return hash_text(backend.to_str() + json.dumps(specials, sort_keys=True))


def compute(
    *,
    data_path: str | Path,
    hf_tokenizer,
    chat_template: str,
    truncation: dict[str, Any],
    negatives: dict[str, Any],
    checkpoint: str | Path,
) -> dict[str, str]:
    """Fingerprint of a scoring pass or of the training run that wants to read its output."""
    return {
        "dataset": hash_path(data_path, "dataset"),
        "tokenizer": tokenizer_hash(hf_tokenizer),
        "template": hash_text(chat_template),
        "truncation": hash_text(json.dumps(truncation, sort_keys=True)),
        "negatives": hash_text(json.dumps(negatives, sort_keys=True)),
        "checkpoint": hash_path(_weights_dir(Path(checkpoint)), "checkpoint"),
    }


def _weights_dir(checkpoint: Path) -> Path:
    """A NeMo checkpoint's weights (its context/ holds paths and config that may differ harmlessly)."""
    weights = checkpoint / "weights"
    return weights if weights.is_dir() else checkpoint


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """Components whose hashes differ, in a fixed order (missing components count as different)."""
    return [name for name in COMPONENTS if expected.get(name) != found.get(name)]


WHAT_DIFFERS = {
    "dataset": "the training data (data.path) has different content",
    "tokenizer": "the tokenizer (tokenizer.path) differs",
    "template": "the chat template (tokenizer.chat_template) differs",
    "truncation": "the truncation settings (data.max_length, data.max_prompt_length, data.add_bos, "
                  "data.append_eos) or the tokenization rule differ",
    "negatives": "the negative columns (dft.num_negatives, data.num_epochs, dft.per_epoch_negatives) differ",
    "checkpoint": "the reference weights (model.init_from) differ",
}


def explain(path: str | Path, names: list[str]) -> str:
    return f"{path} does not match this run: " + "; ".join(WHAT_DIFFERS[n] for n in names) + (
        ". Recompute it with scripts/precompute_ref_logps.py and the same config as training."
    )


# The tokenization rule in force: files scored under an earlier rule (no appended EOS, truncation
# decided per epoch) carry no such entry, so their truncation component differs and is refused.
TOKENIZATION_RULE = "eos-appended; truncation decided per row over the positive and every negative column used"


def truncation_settings(cfg) -> dict[str, Any]:
    """Everything that decides a scored sequence's tokens besides template, tokenizer and columns."""
    return {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
            "add_bos": cfg.data.add_bos, "append_eos": cfg.data.append_eos, "rule": TOKENIZATION_RULE}


def for_run(cfg, hf_tokenizer) -> dict[str, str]:
    """The fingerprint of a training config (its ``data``, ``tokenizer``, ``dft`` and
    ``model.init_from`` keys), with ``hf_tokenizer`` already given the run's chat template."""
    if not cfg.model.init_from:
        raise ValueError("model.init_from: offline reference log-probs are scored from a checkpoint; set it")
    return compute(
        data_path=cfg.data.path,
        hf_tokenizer=hf_tokenizer,
        chat_template=hf_tokenizer.chat_template,
        truncation=truncation_settings(cfg),
        negatives={"num_negatives": cfg.dft.num_negatives, "num_epochs": cfg.data.num_epochs,
                   "per_epoch_negatives": cfg.dft.per_epoch_negatives},
        checkpoint=cfg.model.init_from,
    )
