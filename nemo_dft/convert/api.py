"""Import, export and verify: the functions behind ``scripts/convert_hf.py``.

Inputs are validated before NeMo is imported (about 15 s), so a wrong path or architecture fails
fast.  The conversions themselves go through NeMo's ``llm.import_ckpt`` / ``llm.export_ckpt``
with the connectors of :mod:`nemo_dft.convert.connectors`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nemo_dft.convert.arch import check_hf_dir, check_nemo_dir, detect_hf_arch, read_hf_config
from nemo_dft.convert.cpu import prepare_process
from nemo_dft.convert.errors import ConversionError, MissingFileError
from nemo_dft.convert.progress import note
from nemo_dft.data.io import make_group_readable

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# llm.export_ckpt's "hf" target first runs a ModelOpt probe that loads the whole model a second
# time through the class-registered exporter; our own target name with an explicit
# ``load_connector`` loads it once, for checkpoints of any GPTModel subclass.
EXPORT_TARGET = "nemo_dft_hf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*"]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``bf16`` / ``fp16`` / ``fp32`` (or a torch dtype, or None for "as stored")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_hf_source(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local HF checkpoint directory, downloading a Hub id (at ``revision``) when not local."""
    path = Path(path_or_id).expanduser()
    if path.exists() or "/" not in str(path_or_id) or str(path_or_id).startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    note(f"{path_or_id} is not a local directory; downloading it from the Hugging Face Hub")
    try:
        return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # network, auth and not-found errors all end the same way
        raise MissingFileError(
            f"{path_or_id}: not a local directory, and the Hub download failed: {err}"
        ) from err


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse or clear an existing output; NeMo would otherwise silently keep it."""
    lock = out.with_suffix(out.suffix + ".lock")
    if lock.exists():  # NeMo's connectors skip the conversion while this file exists
        raise ConversionError(
            f"{lock}: another conversion is writing {out}; delete the lock file if it is stale"
        )
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def import_hf(
    hf: str | Path,
    out: str | Path,
    arch: str = "auto",
    model_cls: type | None = None,
    overwrite: bool = False,
    revision: str | None = None,
) -> Path:
    """Convert an HF Mistral/Llama/Qwen2/Qwen3 checkpoint into a NeMo 2 checkpoint directory ``out``.

    ``model_cls`` (an ``llm.GPTModel`` subclass taking ``(config, tokenizer=...)``) is the class
    recorded in the checkpoint's context; the default is NeMo's model class of the architecture.
    """
    hf_dir = resolve_hf_source(hf, revision)
    arch = detect_hf_arch(hf_dir, arch)
    check_hf_dir(hf_dir)
    out = Path(out)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    prepare_process()
    from nemo.collections import llm

    from nemo_dft.convert.connectors import make_importer, register_hf_connectors

    probe = make_importer(hf_dir, arch, model_cls)
    register_hf_connectors(probe.model_cls)
    model = probe.model_cls(probe.config)  # only its class matters: NeMo picks importers by class
    path = llm.import_ckpt(model, f"hf://{hf_dir.resolve()}", output_path=out, overwrite=overwrite, arch=arch)
    check_nemo_dir(Path(path))  # a conversion that silently skipped would leave no context/
    make_group_readable(path)
    note(f"import finished in {time.perf_counter() - start:.1f} s: {path}")
    return Path(path)


def export_hf(
    nemo: str | Path,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    arch: str = "auto",
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert a NeMo 2 checkpoint directory (any GPTModel subclass, any TP/PP) into an HF directory.

    ``dtype`` is the output dtype (default: the checkpoint's); ``tokenizer`` replaces the
    tokenizer stored in the checkpoint's context.  The HF directory carries the tokenizer and its
    chat template.
    """
    nemo_dir = Path(nemo)
    check_nemo_dir(nemo_dir)
    out_dtype = parse_dtype(dtype)
    out = Path(out)
    _prepare_out(out, overwrite)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise MissingFileError(f"{tokenizer}: --tokenizer must be an HF tokenizer directory")
    start = time.perf_counter()
    prepare_process()
    from nemo.collections import llm

    from nemo_dft.convert.connectors import make_exporter

    def load_connector(path: Path, target: str) -> Any:
        return make_exporter(path, arch, tokenizer)

    path = llm.export_ckpt(
        str(nemo_dir),
        EXPORT_TARGET,
        output_path=str(out),
        overwrite=overwrite,
        load_connector=load_connector,
        dtype=out_dtype,
    )
    make_group_readable(path)
    if not _has_chat_template(Path(path)):
        note(f"warning: {path} has no chat template (the checkpoint's tokenizer had none)")
    note(f"export finished in {time.perf_counter() - start:.1f} s: {path}")
    return Path(path)


def _has_chat_template(hf_dir: Path) -> bool:
    if (hf_dir / "chat_template.jinja").is_file() or (hf_dir / "chat_template.json").is_file():
        return True
    config = hf_dir / "tokenizer_config.json"
    return config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8")


def verify(
    hf: str | Path,
    nemo: str | Path,
    prompts: tuple[str, ...] | None = None,
    random: int = 2,
    seed: int = 0,
) -> Any:
    """Load both checkpoints in fp32 and compare their logits; returns a ``LogitComparison``."""
    from nemo_dft.convert import logits as verify_mod
    from nemo_dft.convert.load import load_nemo_model

    hf_dir, nemo_dir = Path(hf), Path(nemo)
    detect_hf_arch(hf_dir)  # validate both sides before the slow NeMo import
    check_nemo_dir(nemo_dir)
    prepare_process()
    from nemo.lightning import teardown
    from transformers import AutoTokenizer

    hf_model = verify_mod.load_hf_model(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    inputs = verify_mod.verification_inputs(
        tokenizer, hf_model.config.vocab_size, prompts or verify_mod.DEFAULT_PROMPTS, random, seed
    )
    nemo_model, trainer = load_nemo_model(nemo_dir, on_gpu=torch.cuda.is_available(), dtype=torch.float32)
    try:
        result = verify_mod.compare_logits(hf_model, nemo_model, inputs)
    finally:
        teardown(trainer, nemo_model)
    config = read_hf_config(hf_dir)
    result.stored_dtypes = (
        str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        str(nemo_model.config.params_dtype).removeprefix("torch."),
    )
    return result
