"""Architecture detection and config validation for both sides of a conversion.

NeMo's HF connectors assume a dense RoPE + SwiGLU + RMSNorm decoder: bias-free (Mistral, Llama),
with q/k/v biases (Qwen2/2.5) or with per-head q/k RMSNorm (Qwen3).  A checkpoint outside that
family would either fail deep inside NeMo or, worse, convert with weights silently dropped, so it
is rejected here with the file and key that differ.  Nothing in this module
imports NeMo, so the CLI can report these errors in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_dft.convert.errors import (
    ConfigMismatchError,
    MissingFileError,
    UnsupportedArchitectureError,
)

SUPPORTED_ARCHS = ("mistral", "llama", "qwen2", "qwen3")
ARCH_CHOICES = (*SUPPORTED_ARCHS, "auto")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_HF_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
)
# model_types that NeMo has connectors for but nemo_dft refuses by name (mixture of experts).
_HF_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "llama4", "llama4_text", "deepseek_v3")
# Dense families NeMo ships connectors for that need more than this module's pattern, refused by
# name with what is missing (README "Supported model families").
_HF_REFUSED_FAMILIES = {
    "gemma": "Gemma scales the embeddings by sqrt(hidden_size), uses GeGLU (gelu_pytorch_tanh) and "
             "norm weights offset by 1",
    "gemma2": "Gemma 2 adds attention and final-logit soft-capping, alternating sliding-window layers and "
              "extra norms around each block to Gemma's embedding scaling and GeGLU",
    "gemma3": "Gemma 3 (a vision-language wrapper) adds local/global layers with two RoPE bases and q/k norm "
              "to Gemma's embedding scaling and GeGLU",
    "gemma3_text": "Gemma 3 adds local/global layers with two RoPE bases and q/k norm to Gemma's embedding "
                   "scaling and GeGLU",
    "phi3": "Phi-3 stores fused qkv_proj and gate_up_proj (another weight map and LoRA split), and NeMo's "
            "connector drops its GQA heads, tied embeddings and longrope scaling",
}
# NeMo config class names (anywhere in the MRO; the most derived wins) that identify each
# architecture.  Qwen3Config derives from Qwen2Config, Llama31Config from LlamaConfig.
_NEMO_CONFIG_CLASSES = {
    "MistralConfig7B": "mistral",
    "LlamaConfig": "llama",
    "Qwen3Config": "qwen3",
    "Qwen2Config": "qwen2",
}
_NEMO_UNSUPPORTED_CLASSES = ("Llama4Config", "Qwen3MoEConfig")
# Attention layout of each architecture, as NeMo's config fields say it.
_ATTENTION_LAYOUT = {
    "mistral": {"add_qkv_bias": False, "qk_layernorm": False},
    "llama": {"add_qkv_bias": False, "qk_layernorm": False},
    "qwen2": {"add_qkv_bias": True, "qk_layernorm": False},
    "qwen3": {"add_qkv_bias": False, "qk_layernorm": True},
}
# rope_scaling types that NeMo's connector of each architecture carries over.
ROPE_SCALING_TYPES = {"llama": ("llama3",)}


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF checkpoint directory."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise MissingFileError(f"{hf_dir}: HF checkpoint directory does not exist")
    if not path.is_file():
        raise MissingFileError(f"{path}: missing; an HF checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigMismatchError(f"{path}: not valid JSON ({err})") from err


def detect_hf_arch(hf_dir: Path, requested: str = "auto") -> str:
    """Architecture of an HF checkpoint, checked against ``requested`` and our supported set."""
    config = read_hf_config(hf_dir)
    where = Path(hf_dir) / "config.json"
    model_type = config.get("model_type")
    if model_type in _HF_MOE_TYPES or config.get("num_local_experts") or config.get("num_experts"):
        raise UnsupportedArchitectureError(
            f"{where}: model_type={model_type!r} is a mixture-of-experts model; nemo_dft converts dense "
            f"{', '.join(SUPPORTED_ARCHS)} models only"
        )
    if model_type in _HF_REFUSED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"{where}: model_type={model_type!r} is not supported: {_HF_REFUSED_FAMILIES[model_type]}; "
            f"nemo_dft converts {', '.join(SUPPORTED_ARCHS)}"
        )
    if model_type not in SUPPORTED_ARCHS:
        raise UnsupportedArchitectureError(
            f"{where}: model_type={model_type!r} (architectures={config.get('architectures')}) is not "
            f"supported; nemo_dft converts {', '.join(SUPPORTED_ARCHS)}"
        )
    _check_requested(requested, model_type, where)
    check_hf_config(config, model_type, where)
    return model_type


def check_hf_dir(hf_dir: Path) -> None:
    """Fail early when an HF checkpoint directory lacks weights or a tokenizer."""
    hf_dir = Path(hf_dir)
    if not any((hf_dir / name).is_file() for name in HF_WEIGHT_FILES):
        raise MissingFileError(f"{hf_dir}: no weights found (looked for {', '.join(HF_WEIGHT_FILES)})")
    if not any((hf_dir / name).is_file() for name in HF_TOKENIZER_FILES):
        raise MissingFileError(
            f"{hf_dir}: no tokenizer found (looked for {', '.join(HF_TOKENIZER_FILES)}); the converted "
            "checkpoint must carry the tokenizer and chat template"
        )


def check_hf_config(config: dict[str, Any], arch: str, where: Path | str) -> None:
    """Reject HF configs whose features NeMo's connector for ``arch`` would not carry over."""
    for key in _HF_REQUIRED_KEYS:
        if key not in config:
            raise ConfigMismatchError(f"{where}: key {key!r} is missing")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigMismatchError(
            f"{where}: hidden_act={config['hidden_act']!r}; only 'silu' (SwiGLU) converts"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConfigMismatchError(f"{where}: {key}=true; NeMo's {arch} connector has no bias weights")
    if config.get("use_sliding_window"):
        raise ConfigMismatchError(
            f"{where}: use_sliding_window=true; NeMo's {arch} connector converts full attention only"
        )
    check_rope_scaling(config.get("rope_scaling"), arch, where)


def check_rope_scaling(rope_scaling: dict[str, Any] | None, arch: str, where: Path | str) -> None:
    """Refuse a ``rope_scaling`` type that NeMo's config for ``arch`` cannot express."""
    if not rope_scaling:
        return
    key = "rope_type" if "rope_type" in rope_scaling else "type"
    rope_type = rope_scaling.get(key)
    allowed = ROPE_SCALING_TYPES.get(arch, ())
    if rope_type == "default":  # transformers' spelling of "no scaling"
        return
    if rope_type not in allowed:
        supported = f"only {', '.join(map(repr, allowed))} converts" if allowed else "none converts"
        raise ConfigMismatchError(
            f"{where}: rope_scaling.{key}={rope_type!r} cannot be expressed in NeMo's {arch} config; "
            f"for {arch} {supported}"
        )


def _check_requested(requested: str, found: str, where: Path | str) -> None:
    if requested not in ARCH_CHOICES:
        raise UnsupportedArchitectureError(
            f"--arch {requested!r} is not supported; choose one of {', '.join(ARCH_CHOICES)}"
        )
    if requested != "auto" and requested != found:
        raise ConfigMismatchError(f"--arch {requested} was requested but {where} describes a {found} model")


def check_nemo_dir(nemo_dir: Path) -> None:
    """A NeMo 2 checkpoint directory must hold ``context/`` and ``weights/``."""
    nemo_dir = Path(nemo_dir)
    if not nemo_dir.is_dir():
        raise MissingFileError(f"{nemo_dir}: NeMo checkpoint directory does not exist")
    for sub in ("context", "weights"):
        if not (nemo_dir / sub).is_dir():
            raise MissingFileError(
                f"{nemo_dir / sub}: missing; a NeMo 2 checkpoint directory has context/ and weights/ "
                "(pass the step directory, e.g. .../checkpoints/<name>, not its parent)"
            )
    if (nemo_dir / "weights" / "adapter_metadata.json").is_file():
        raise ConfigMismatchError(
            f"{nemo_dir / 'weights' / 'adapter_metadata.json'}: this is a PEFT (adapter) checkpoint; merge "
            "the adapters into the base model (llm.peft.merge_lora) before exporting"
        )


def detect_nemo_arch(config: Any, requested: str = "auto", where: Path | str = "model.config") -> str:
    """Architecture of a NeMo model config, from its class or from ``requested``."""
    names = [cls.__name__ for cls in type(config).__mro__]
    bad = [name for name in _NEMO_UNSUPPORTED_CLASSES if name in names]
    if bad:
        raise UnsupportedArchitectureError(f"{where}: config class {bad[0]} is not supported")
    found = next((_NEMO_CONFIG_CLASSES[name] for name in names if name in _NEMO_CONFIG_CLASSES), None)
    if found is None and requested == "auto":
        raise UnsupportedArchitectureError(
            f"{where}: config class {type(config).__name__} names no architecture; pass --arch "
            f"({' or '.join(SUPPORTED_ARCHS)}) to say which HF layout to write"
        )
    arch = requested if requested != "auto" else found
    if found is not None:
        _check_requested(requested, found, where)
    elif arch not in SUPPORTED_ARCHS:
        _check_requested(requested, "unknown", where)
    check_nemo_config(config, arch, where)
    return arch


def check_nemo_config(config: Any, arch: str, where: Path | str) -> None:
    """Reject NeMo configs that the HF layout of ``arch`` cannot express."""
    expected = {
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "position_embedding_type": "rope",
        "num_moe_experts": None,
        **_ATTENTION_LAYOUT[arch],
    }
    for key, value in expected.items():
        actual = getattr(config, key, value)
        if actual != value:
            raise ConfigMismatchError(
                f"{where}: {key}={actual!r}, but an HF {arch} checkpoint needs {value!r}"
            )
    activation = getattr(getattr(config, "activation_func", None), "__name__", "silu")
    if activation != "silu":
        raise ConfigMismatchError(
            f"{where}: activation_func={activation}, but an HF {arch} checkpoint needs silu"
        )
