"""Configuration of negative generation: a typed schema with the paper's defaults.

The schema lives here (not only in YAML) so that OmegaConf rejects misspelt keys and wrong
types up front, before a model is loaded on a cluster node.  ``conf/generate_negatives.yaml``
documents the same keys with the same defaults (a test keeps the two in sync).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.loading import ConfigError, load_structured
from nemo_dft.data.chat_template import NAMED_CHAT_TEMPLATES
from nemo_dft.evaluation.extraction import EXTRACTIONS
from nemo_dft.generation.verifier_filter import SHORT_POLICIES

DEFAULT_SYSTEM_MESSAGE = "You are an unhelpful assistant."
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{query}\n\n### Response:"
)
BACKENDS = ("vllm", "hf")
PROMPT_STYLES = ("chat", "template")
LAYOUTS = ("auto", "messages", "chosen", "sharegpt", "query_response")
EMPTY_POLICIES = ("keep", "resample", "fail")


@dataclass
class ModelConfig:
    path: str | None = None
    revision: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"


@dataclass
class FormatConfig:
    layout: str = "auto"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    conversations_field: str = "conversations"
    query_field: str = "query"
    response_field: str = "response"
    id_field: str | None = None
    system_field: str | None = "system"


@dataclass
class DataConfig:
    input: str | None = None
    split: str = "train"
    limit: int | None = None
    format: FormatConfig = field(default_factory=FormatConfig)


@dataclass
class PromptConfig:
    style: str = "chat"
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE
    template: str = ALPACA_TEMPLATE
    # chat style, tokenizer without a chat template (e.g. Mistral-7B-v0.1): zephyr (the paper's
    # generator), alpaca, a Jinja template, or null (stop with an error)
    fallback_template: str | None = "zephyr"
    # BOS first, as training puts it (data.add_bos, default true): the samples then continue the
    # very token sequence training scores, whether or not the tokenizer adds BOS by itself
    add_bos: bool = True


@dataclass
class SamplingConfig:
    n: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 50
    max_new_tokens: int = 320
    seed: int = 0
    on_empty: str = "keep"
    max_resample_rounds: int = 3


@dataclass
class FilterConfig:
    # drop samples whose final answer equals the reference's (nemo_dft/generation/verifier_filter.py)
    exclude_correct: bool = False
    extract: str = "answer_is"  # answer_is | number | exact: the extractors of scripts/evaluate.py
    on_short: str = "drop"  # too few incorrect samples after the rounds: drop the prompt, or keep correct ones


@dataclass
class OutputConfig:
    dir: str | None = None


@dataclass
class ShardConfig:
    index: int | None = 0
    count: int = 1


@dataclass
class MergeConfig:
    output: str | None = None
    after_all_shards: bool = True


@dataclass
class VLLMConfig:
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    cpu_kvcache_space_gib: int = 1
    batch_size: int = 1024


@dataclass
class HFConfig:
    device: str = "auto"
    num_threads: int = 0


@dataclass
class GenerationConfig:
    backend: str = "vllm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    hf: HFConfig = field(default_factory=HFConfig)


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults, then ``config_file``, then ``key=value`` overrides; unknown keys are errors."""
    return load_structured(GenerationConfig, config_file, overrides)


def _require(cfg: DictConfig, key: str) -> None:
    if OmegaConf.select(cfg, key) in (None, ""):
        raise ConfigError(f"'{key}' is required (set it in the config file or as {key}=...)")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"'{key}' must be one of {list(allowed)}, got {value!r}")


def validate_for_generation(cfg: DictConfig) -> None:
    """Check everything a generation run needs before any model is loaded."""
    for key in ("model.path", "data.input", "output.dir"):
        _require(cfg, key)
    _choice(cfg, "backend", BACKENDS)
    _choice(cfg, "prompt.style", PROMPT_STYLES)
    _choice(cfg, "data.format.layout", LAYOUTS)
    _choice(cfg, "sampling.on_empty", EMPTY_POLICIES)
    _choice(cfg, "filter.extract", EXTRACTIONS)
    _choice(cfg, "filter.on_short", SHORT_POLICIES)
    if cfg.prompt.style == "template" and "{query}" not in cfg.prompt.template:
        raise ConfigError("'prompt.template' must contain the placeholder {query}")
    fallback = cfg.prompt.fallback_template
    if fallback is not None and fallback not in NAMED_CHAT_TEMPLATES and "{%" not in fallback and "{{" not in fallback:
        raise ConfigError(
            f"'prompt.fallback_template' must be one of {sorted(NAMED_CHAT_TEMPLATES)}, a Jinja template "
            f"or null, got {fallback!r}"
        )
    checks = [
        ("sampling.n", cfg.sampling.n >= 1, ">= 1"),
        ("sampling.temperature", cfg.sampling.temperature > 0, "> 0 (sampling, not greedy)"),
        ("sampling.top_p", 0 < cfg.sampling.top_p <= 1, "in (0, 1]"),
        ("sampling.top_k", cfg.sampling.top_k >= -1, ">= -1 (0 or -1 disables it)"),
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens >= 1, ">= 1"),
        ("sampling.max_resample_rounds", cfg.sampling.max_resample_rounds >= 0, ">= 0"),
        ("shard.count", cfg.shard.count >= 1, ">= 1"),
        ("data.limit", cfg.data.limit is None or cfg.data.limit >= 0, ">= 0 or null"),
        ("vllm.batch_size", cfg.vllm.batch_size >= 1, ">= 1"),
        ("hf.num_threads", cfg.hf.num_threads >= 0, ">= 0 (0: torch's default)"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"'{key}' must be {rule}, got {OmegaConf.select(cfg, key)!r}")
    model = str(cfg.model.path)
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise ConfigError(f"'model.path': {model} does not exist (a local model directory, or a hub id org/name)")
    index = cfg.shard.index
    if index is not None and not 0 <= index < cfg.shard.count:
        raise ConfigError(
            f"'shard.index' must be in [0, {cfg.shard.count}) or null (all shards), got {index}"
        )


def validate_for_merge(cfg: DictConfig) -> None:
    _require(cfg, "output.dir")
    if cfg.shard.count < 1:
        raise ConfigError(f"'shard.count' must be >= 1, got {cfg.shard.count}")


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine the generated text; stored in every shard's metadata."""
    return {
        "backend": cfg.backend,
        "model": OmegaConf.to_container(cfg.model),
        "data": OmegaConf.to_container(cfg.data),
        "prompt": OmegaConf.to_container(cfg.prompt),
        "sampling": OmegaConf.to_container(cfg.sampling),
        "shard_count": cfg.shard.count,
        # only when on, so that shards generated before the filter existed keep their fingerprint
        **({"filter": OmegaConf.to_container(cfg.filter)} if cfg.filter.exclude_correct else {}),
    }


def fingerprint(cfg: DictConfig) -> str:
    """A short hash of :func:`settings`: shards of one dataset must all carry the same one."""
    blob = json.dumps(settings(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
