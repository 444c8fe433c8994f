"""Adapter-only checkpoints of LoRA runs (``peft.checkpoint=adapters``).

A LoRA run trains a few MB of adapters on a frozen base of many GB; a checkpoint that repeats the
base (``peft.checkpoint=full``) costs the base's size every time.  An adapter-only checkpoint is
still an ordinary NeMo 2 distributed checkpoint (``context/``, ``weights/`` written by megatron-core
``dist_checkpointing``), with the optimizer, LR scheduler, u table, data position and generators as
always, but its model part is the model's sharded state dict filtered to the adapter keys -- the
filtering NeMo's own PEFT checkpointing does (``WrappedAdapterIO`` with ``PEFT.adapter_key_filter``,
``".adapter." in key``).  Its ``common.pt`` records the base under :data:`BASE_KEY`: the path given
in ``model.init_from`` and :func:`base_fingerprint` of it.  Loading one fills the base keys of the
same sharded state dict from that path with ``dist_checkpointing`` (any TP/PP of either side), after
checking that the fingerprint still matches (:func:`check_recorded_base`).

Why not NeMo's ``WrappedAdapterIO`` itself: it records only the base's path in
``weights/adapter_metadata.json`` (nothing notices a base that was replaced or retrained), it needs
NeMo's PEFT callback, which applies the transform at fit start while this project builds the
adapters with the model (seeded A, the same for every layout), and that file makes NeMo's and this
project's exporters take the checkpoint for an unmerged PEFT one.  The record is therefore a key of
``common.pt``, next to the u table, and the filtering and loading are NeMo's and megatron's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from nemo_dft.config.loading import ConfigError

BASE_KEY = "dft_lora_base"  # in common.pt: {"init_from": str, "fingerprint": str}
SAMPLE_BYTES = 64 * 1024  # of each stored tensor's bytes, at its start and at its end


def is_adapter_key(key: str) -> bool:
    """NeMo's ``PEFT.adapter_key_filter`` for this project's adapters (the only trainable tensors)."""
    return ".adapter." in key


def _is_base_weight(key: str) -> bool:
    return key.startswith("module.") and not is_adapter_key(key)


def base_fingerprint(checkpoint: str | Path) -> str:
    """sha256 of the base weights' metadata in ``checkpoint/weights/.metadata`` (every model tensor
    but the adapters: name, global shape, dtype) and of the first and last 64 KiB of each stored
    piece of them.  Cheap (at 7B some 300 tensors, about 40 MB read, not the 14.5 GB of weights),
    independent of the layout the base was saved with only as far as its shards are (a base resaved
    at another TP/PP fingerprints differently and is refused), and it changes when the base is
    replaced by another model or retrained: a weight that changed almost surely changes its first
    bytes.  Raises ``ValueError`` for a directory that is not a readable checkpoint with weights."""
    from torch.distributed.checkpoint import FileSystemReader

    weights = Path(checkpoint) / "weights"
    try:
        metadata = FileSystemReader(str(weights)).read_metadata()
    except Exception as err:  # missing, or not a torch_dist checkpoint
        raise ValueError(f"{weights / '.metadata'} is not readable ({type(err).__name__}: {err})") from err
    digest = hashlib.sha256()
    tensors = sorted((key, meta) for key, meta in metadata.state_dict_metadata.items()
                     if _is_base_weight(key) and hasattr(meta, "size"))
    if not tensors:
        raise ValueError(f"{weights} holds no base model weights")
    for key, meta in tensors:
        digest.update(f"{key}|{tuple(meta.size)}|{meta.properties.dtype}\n".encode())
    pieces = sorted(((index.fqn, tuple(index.offset or ())), info) for index, info in metadata.storage_data.items()
                    if _is_base_weight(index.fqn))
    for (fqn, offset), info in pieces:
        try:
            with open(weights / info.relative_path, "rb") as handle:
                handle.seek(info.offset)
                head = handle.read(min(info.length, SAMPLE_BYTES))
                handle.seek(info.offset + max(info.length - SAMPLE_BYTES, 0))
                tail = handle.read(min(info.length, SAMPLE_BYTES))
        except OSError as err:
            raise ValueError(f"{weights / info.relative_path} is not readable ({err})") from err
        digest.update(f"{fqn}|{offset}|{info.length}\n".encode() + head + tail)
    return digest.hexdigest()


def recorded_base(checkpoint: str | Path) -> dict[str, str] | None:
    """The base an adapter-only checkpoint was saved against (``init_from``, ``fingerprint``), or
    None for a checkpoint that holds its weights (full fine-tuning, ``peft.checkpoint=full``)."""
    import torch

    common = Path(checkpoint) / "weights" / "common.pt"
    if not common.is_file() and Path(checkpoint, "common.pt").is_file():  # given its weights/ directory
        common = Path(checkpoint, "common.pt")
    if not common.is_file():
        return None
    record = torch.load(common, map_location="cpu", weights_only=False).get(BASE_KEY)
    return dict(record) if record else None


def check_recorded_base(checkpoint: str | Path, base: str | Path | None = None) -> Path | None:
    """The base to load an adapter-only ``checkpoint`` with (``base``, default the recorded
    ``init_from``), after checking that it is the base the checkpoint was saved against; None for a
    full checkpoint.  A missing, unreadable or different base is a ``ConfigError`` naming both paths."""
    record = recorded_base(checkpoint)
    if record is None:
        return None
    base_path = Path(base if base is not None else record["init_from"])
    where = f"{checkpoint} holds LoRA adapters only (peft.checkpoint=adapters), saved against the base {base_path}"
    if not base_path.is_dir():
        raise ConfigError(f"model.init_from: {where}, which does not exist; restore that base or resume from "
                          "a checkpoint that holds its weights (peft.checkpoint=full)")
    try:
        found = base_fingerprint(base_path)
    except ValueError as err:
        raise ConfigError(f"model.init_from: {where}, which cannot be read: {err}") from err
    if found != record["fingerprint"]:
        raise ConfigError(f"model.init_from: {where}, but {base_path} now holds different weights (fingerprint "
                          f"{found[:12]}, saved {record['fingerprint'][:12]}); the adapters only apply to the base "
                          "they were trained on: restore it")
    return base_path


def refuse_adapter_only_init_from(path: str | Path | None, key: str = "model.init_from") -> None:
    """``model.init_from`` gives initial weights; an adapter-only checkpoint has none of its own."""
    if not path:
        return
    record = recorded_base(path) if Path(path, "weights", "common.pt").is_file() else None
    if record is not None:
        raise ConfigError(f"{key}: {path} holds LoRA adapters only (peft.checkpoint=adapters), no base weights; "
                          f"start from its base {record['init_from']}, or export it merged "
                          "(scripts/convert_hf.py export) and import that to continue from its adapters")


def adapter_record(init_from: str | Path) -> dict[str, str]:
    """What a LoRA run with ``peft.checkpoint=adapters`` records of its base, checked at start."""
    try:
        fingerprint = base_fingerprint(init_from)
    except ValueError as err:
        raise ConfigError(f"model.init_from: {init_from}: {err}; peft.checkpoint=adapters reloads the base "
                          "from it") from err
    # absolute, so that an export from another directory finds it
    return {"init_from": str(Path(init_from).absolute()), "fingerprint": fingerprint}


def split_base_entries(state: dict[str, Any]) -> dict[str, Any]:
    """Take the base model's entries out of a model sharded state dict (in place); returns them."""
    return {key: state.pop(key) for key in [k for k in state if not is_adapter_key(k)]}


def load_adapters_and_base(load, path, base: Path, sharded_state_dict: dict[str, Any], **kwargs) -> dict[str, Any]:
    """``load`` (a checkpoint IO's ``load_checkpoint``) of an adapter-only checkpoint: the adapters,
    optimizer and common state from ``path``, the base weights from ``base``; the returned model
    state dict is complete, as a full checkpoint's would be."""
    base_entries = split_base_entries(sharded_state_dict["state_dict"])
    checkpoint = load(path, sharded_state_dict=sharded_state_dict, **kwargs)
    loaded = load(str(base), sharded_state_dict={"state_dict": base_entries}, **kwargs)
    checkpoint["state_dict"].update(loaded["state_dict"])
    return checkpoint
