"""The training configuration: typed defaults (the embedded tiny run), YAML files and dotted
command-line overrides, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nemo_dft.config.loading import ConfigError, load_structured
from nemo_dft.demo.tiny_model import TINY_MISTRAL_SHAPE
from nemo_dft.demo.tiny_task import ASSET_DIR


@dataclass
class RunConfig:
    dir: str = "runs/tiny-dft"
    seed: int = 1234


@dataclass
class TrainerConfig:
    devices: int = 1
    num_nodes: int = 1
    max_steps: int | None = None  # None: every epoch of data.num_epochs
    accelerator: str = "auto"  # auto | cpu | gpu
    val_check_interval: int | None = None  # None: held-out evaluation only before and after training
    progress_bar: bool = True
    # Signals that make training save a checkpoint at the end of the current step and exit with
    # code 75 (EXIT_PREEMPTED), so a Slurm script can requeue the job; [] leaves signals alone.
    # SIGINT (Ctrl-C) too: a second Ctrl-C exits at once, without a checkpoint.
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    # A step with a non-finite loss, u or gradient is never applied: stop (exit 3, naming the step
    # and the example ids) or skip it (counted as skipped_steps in metrics.jsonl).
    nonfinite: str = "stop"


@dataclass
class ModelConfig:
    arch: str = "mistral"
    init_from: str | None = None  # NeMo checkpoint directory with the initial weights
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    micro_batch_size: int = 4  # prompts (groups of 1 + m sequences)
    global_batch_size: int = 8  # prompts
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # FP8 through Transformer Engine (GPU only): null | hybrid | e4m3, and the scaling recipe:
    # delayed | tensorwise | mxfp8 | blockwise.  See nemo_dft/platform/precision.py.
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param: bool = False
    # Memory features (nemo_dft/platform/memory.py): optimizer state and fp32 main weights sharded over
    # data-parallel ranks (megatron-core's distributed optimizer), gradient reduction overlapped with
    # the backward pass, parameter all-gather overlapped with the forward pass (distributed optimizer
    # only), and gradients reduced in fp32 (false: in the compute dtype).
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    # Activation recomputation: null | full | selective (core attention); full needs recompute_method
    # (uniform | block) and recompute_num_layers.
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # Sequence parallelism over the tensor-parallel ranks (needs TP >= 2 and Transformer Engine).
    sequence_parallel: bool = False
    # tiny: the embedded demo's shape under model.config; null: the architecture's own config
    # (e.g. NeMo's MistralConfig7B), which the paper recipes use; checkpoint: the config stored in
    # model.init_from (architecture and sizes of whatever model it holds; model.arch is not used).
    preset: str | None = "tiny"
    config: dict[str, Any] = field(default_factory=dict)  # overrides of NeMo GPT config fields


@dataclass
class TokenizerConfig:
    path: str | None = None  # HF tokenizer directory; None: the locally built tiny tokenizer
    # Training prompt template: null (the tokenizer's own), zephyr, alpaca, or a Jinja template.
    chat_template: str | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-3
    # End of the cosine decay; null: optim.lr / MIN_LR_DIVISOR, so that any lr a user types (1e-5 for
    # fine-tuning) has a schedule; resolved in place by resolve_min_lr().
    min_lr: float | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8


@dataclass
class DFTConfig:
    # dft (reference-based) | dft2 (reference-free) | sft (token-mean NLL of the positives, the
    # baseline); null: dft, or dft2 with ref_free=true.  Resolved in place by resolve_objective().
    objective: str | None = None
    num_negatives: int = 2  # m; 0 only under sft (data then needs no generated_k columns)
    tau: float = 1.0
    gamma: float = 0.85
    u_init: float = 0.0
    ref_free: bool = False  # true: no reference model (DFT2, or SFT); set from dft.objective when resolved
    reference: str = "frozen"  # frozen (on the fly) | offline (dft.ref_logps file)
    ref_logps: str | None = None  # file written by scripts/precompute_ref_logps.py
    per_epoch_negatives: bool = True


# The linear layers of a megatron transformer layer that LoRA can adapt (NeMo's names).
TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class PeftConfig:
    # null: full fine-tuning; lora: NeMo's LoRA adapters on the frozen model (nemo_dft/modeling/lora.py),
    # and reference-based DFT scores its reference with the adapters off (no second copy)
    scheme: str | None = None
    dim: int = 8  # LoRA rank
    alpha: float = 16.0  # the adapter output is scaled by alpha / dim
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    # What a LoRA run's checkpoints hold: adapters (the adapters and their optimizer state, the base
    # recorded by model.init_from's path and fingerprint and reloaded from it) | full (every weight) |
    # auto (adapters when model.init_from is set, else full: a random init cannot be reloaded)
    checkpoint: str = "auto"


@dataclass
class DataConfig:
    path: str = str(ASSET_DIR / "train.jsonl")
    eval_path: str | None = str(ASSET_DIR / "heldout.jsonl")
    num_epochs: int = 4
    max_length: int = 64
    max_prompt_length: int = 32
    shuffle: bool = True
    add_bos: bool = True
    # The paper trainer's rule: append EOS to every response whose last token is not EOS (with the
    # zephyr template responses then end </s> \n </s>); false scores the template's text only.
    append_eos: bool = True
    # An empty real/generated answer: error | drop (leave the row out, counted) | keep (train on it, as the
    # paper does with empty generations; the recipes that mirror the paper use keep)
    empty_answers: str = "error"
    # Lay each micro-batch's whole groups end to end in one row, without padding (nemo_dft.data.packing);
    # attention stays within each sequence.
    packing: bool = False
    # With packing: rows of exactly this many positions, each holding as many whole groups as fit,
    # one micro-batch per row (a step then has a varying number of micro-batches; it still trains
    # model.global_batch_size prompts).  Required under pipeline parallelism, which needs one shape;
    # at least (1 + dft.num_negatives) * (data.max_length - 1), a multiple of 8.  null: one row per
    # micro-batch of model.micro_batch_size prompts, as long as its groups.
    pack_length: int | None = None


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: only at the end


@dataclass
class LogConfig:
    tensorboard: bool = True  # event files in run.dir/tensorboard/
    wandb_project: str | None = None  # W&B on when set; files in run.dir/wandb/
    wandb_name: str | None = None  # None: the name of run.dir
    wandb_mode: str = "online"  # online | offline (no network; `wandb sync run.dir/wandb/offline-run-*` later)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dft: DFTConfig = field(default_factory=DFTConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True) -> DictConfig:
    """Defaults, then ``config_file``, then ``key=value`` overrides, validated (``check_files``: also
    that the data and reference files exist, which planning a run elsewhere does not need)."""
    cfg = load_structured(TrainConfig, config_file, overrides)
    validate(cfg, check_files=check_files)
    return cfg


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def data_parallel_size(cfg: DictConfig) -> int:
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    model_parallel = (
        cfg.model.tensor_model_parallel_size
        * cfg.model.pipeline_model_parallel_size
        * cfg.model.context_parallel_size
    )
    return world // model_parallel


# The head and layer counts of NeMo's own architecture configs (model.preset=null), so that a
# layout they cannot take is refused before NeMo is imported (a test checks them against NeMo).
ARCHITECTURE_SHAPES: dict[str, dict[str, int]] = {
    "llama": {"num_layers": 32, "num_attention_heads": 32, "num_query_groups": 32},
    "mistral": {"num_layers": 32, "num_attention_heads": 32, "num_query_groups": 8},
    "qwen2": {"num_layers": 28, "num_attention_heads": 28, "num_query_groups": 4},  # Qwen2.5-7B
    "qwen3": {"num_layers": 36, "num_attention_heads": 32, "num_query_groups": 8},  # Qwen3-8B
}
# model.arch values (the keys of nemo_dft.modeling.gpt_config.ARCHITECTURES; a test checks both agree).
MODEL_ARCHS = ("gpt", "llama", "mistral", "qwen2", "qwen3")


def known_model_shape(cfg: DictConfig) -> dict[str, Any]:
    """The shape fields known without NeMo: the preset's (or architecture's) and ``model.config``
    (a checkpoint preset's shape is only known once its context is read)."""
    shape = dict(ARCHITECTURE_SHAPES.get(cfg.model.arch, {})) if cfg.model.preset is None else {}
    shape.update(model_config_overrides(cfg))
    return shape


def model_config_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The NeMo GPT config fields this run sets: the preset's shape, then ``model.config``."""
    from omegaconf import OmegaConf

    # tiny: the vocabulary is the tokenizer's (NeMo's Qwen configs preset Qwen's 151936/152064)
    overrides = {**TINY_MISTRAL_SHAPE, "vocab_size": None} if cfg.model.preset == "tiny" else {}
    overrides.update(OmegaConf.to_container(cfg.model.config, resolve=True))
    return overrides


def uses_pack_length(cfg: Any) -> bool:
    """True when training packs rows of ``data.pack_length`` (a varying number of prompts each)."""
    return bool(cfg.data.packing) and cfg.data.pack_length is not None


def _check_pack_length(cfg: Any) -> None:
    pipeline = cfg.model.pipeline_model_parallel_size > 1
    smallest = (1 + cfg.dft.num_negatives) * (cfg.data.max_length - 1)  # the longest group's positions
    _require(not (cfg.data.packing and pipeline and cfg.data.pack_length is None), "data.pack_length",
             "packed rows under pipeline parallelism (model.pipeline_model_parallel_size > 1) need one length: "
             f"set data.pack_length (at least {smallest}, (1 + dft.num_negatives) * (data.max_length - 1)), "
             "or data.packing=false")
    if cfg.data.pack_length is None:
        return
    _require(cfg.data.packing, "data.pack_length", "is set but data.packing=false; set data.packing=true, "
             "or data.pack_length=null")
    _require(isinstance(cfg.data.pack_length, int) and cfg.data.pack_length >= smallest, "data.pack_length",
             f"must be an integer of at least {smallest}, (1 + dft.num_negatives) * (data.max_length - 1), "
             f"so that every group fits a row; got {cfg.data.pack_length!r}")
    _require(cfg.data.pack_length % 8 == 0, "data.pack_length", f"must be a multiple of 8; got {cfg.data.pack_length}")


def _check_tokenizer(cfg: DictConfig) -> None:
    """``tokenizer.path`` and ``tokenizer.chat_template`` from the files alone (no library import)."""
    from nemo_dft.data.chat_template import resolve_chat_template, stored_chat_template, tokenizer_dir_problem

    path = cfg.tokenizer.path
    if path is not None:
        problem = tokenizer_dir_problem(str(path))
        _require(problem is None, "tokenizer.path", str(problem))
    # the tiny tokenizer (path null) is built here with a template; otherwise read what the files say
    stored = "tiny" if path is None else stored_chat_template(str(path))
    try:
        resolve_chat_template(cfg.tokenizer.chat_template, stored)
    except ValueError as err:
        where = f" ({path})" if path is not None and cfg.tokenizer.chat_template is None else ""
        raise ConfigError(f"{err}{where}") from err


OBJECTIVES = ("dft", "dft2", "sft")


def resolve_objective(cfg: DictConfig) -> None:
    """Settle ``dft.objective`` and ``dft.ref_free`` together, in place: null follows ``ref_free``
    (the older key: true selects DFT2); after resolution ``ref_free`` is true exactly when no
    reference model is used (dft2, sft).  ``objective=dft`` with ``ref_free=true`` is a contradiction."""
    d = cfg.dft
    if d.objective is None:
        d.objective = "dft2" if d.ref_free else "dft"
    _require(d.objective in OBJECTIVES, "dft.objective", f"{d.objective!r} is not one of {', '.join(OBJECTIVES)}")
    _require(not (d.objective == "dft" and d.ref_free), "dft.objective",
             "dft (reference-based) contradicts dft.ref_free=true; use dft.objective=dft2 (or sft), "
             "or dft.ref_free=false")
    d.ref_free = d.objective != "dft"


MIN_LR_DIVISOR = 10  # the default optim.min_lr is optim.lr / 10 (3e-4 for the default 3e-3)


def resolve_min_lr(cfg: DictConfig) -> None:
    """Settle ``optim.min_lr`` in place: null becomes ``optim.lr / 10``, divided as the decimal the user
    typed (3e-3 gives exactly the 3e-4 that earlier runs recorded, so they still resume); a value above
    ``optim.lr`` is refused here, where NeMo's scheduler would refuse it only after building the model."""
    o = cfg.optim
    _require(o.lr >= 0, "optim.lr", f"must be >= 0, got {o.lr}")
    if o.min_lr is None:
        o.min_lr = float(Decimal(repr(o.lr)) / MIN_LR_DIVISOR)
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr",
             f"{o.min_lr} must lie between 0 and optim.lr={o.lr} (the cosine schedule decays from optim.lr "
             f"to optim.min_lr); lower optim.min_lr, or leave it null for optim.lr / {MIN_LR_DIVISOR}")


def validate(cfg: DictConfig, check_files: bool = True) -> None:
    """Reject impossible settings before anything is built (``dft.objective`` is resolved first)."""
    from nemo_dft.objective import validate_hyperparameters

    resolve_objective(cfg)
    resolve_min_lr(cfg)
    try:
        validate_hyperparameters(cfg.dft.tau, cfg.dft.gamma)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    from nemo_dft.platform import memory
    from nemo_dft.platform.precision import static_errors

    errors = static_errors(cfg.model) + memory.static_errors(cfg.model)
    if errors:
        key, problem = errors[0]
        raise ConfigError(f"{key}: {problem}")
    m = cfg.model
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                "micro_batch_size", "global_batch_size"):
        _require(m[key] >= 1, f"model.{key}", f"must be >= 1, got {m[key]}")
    _require(cfg.trainer.devices >= 1 and cfg.trainer.num_nodes >= 1, "trainer.devices",
             "devices and num_nodes must be >= 1")
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
    _require(world % model_parallel == 0, "trainer.devices",
             f"{world} processes are not divisible by TP x PP x CP = {model_parallel}")
    dp = world // model_parallel
    _require(m.global_batch_size % (m.micro_batch_size * dp) == 0, "model.global_batch_size",
             f"{m.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
             f"= {m.micro_batch_size} x {dp}")
    _require(m.context_parallel_size == 1, "model.context_parallel_size",
             "context parallelism is not supported for DFT yet (sequences are short and whole groups "
             "must stay on one rank)")
    _require(m.arch in MODEL_ARCHS, "model.arch", f"unknown architecture {m.arch!r}; choose one of "
             f"{', '.join(MODEL_ARCHS)}")
    _require(m.preset in (None, "tiny", "checkpoint"), "model.preset",
             f"{m.preset!r} is not 'tiny', 'checkpoint' or null")
    _require(m.preset != "checkpoint" or m.init_from is not None, "model.preset",
             "'checkpoint' takes the architecture from model.init_from, which is not set")
    layers = known_model_shape(cfg).get("num_layers")
    if layers is not None:
        _require(m.pipeline_model_parallel_size <= layers, "model.pipeline_model_parallel_size",
                 f"{m.pipeline_model_parallel_size} stages exceed the model's {layers} layers")
        if m.recompute_granularity == "full" and m.recompute_num_layers is not None:
            per_stage = layers // m.pipeline_model_parallel_size
            _require(m.recompute_num_layers <= per_stage, "model.recompute_num_layers",
                     f"{m.recompute_num_layers} exceeds the {per_stage} layers of a pipeline stage")
    if cfg.dft.objective == "sft":
        _require(cfg.dft.num_negatives >= 0, "dft.num_negatives", "must be >= 0")
    else:
        _require(cfg.dft.num_negatives >= 1, "dft.num_negatives",
                 f"must be >= 1 for dft.objective={cfg.dft.objective} (0 is for sft only)")
    _require(cfg.dft.reference in ("frozen", "offline"), "dft.reference",
             f"unknown mode {cfg.dft.reference!r}; use 'frozen' or 'offline'")
    if not cfg.dft.ref_free and cfg.dft.reference == "offline":
        _require(cfg.dft.ref_logps is not None, "dft.ref_logps",
                 "dft.reference=offline needs the file written by scripts/precompute_ref_logps.py")
        _require(not check_files or Path(cfg.dft.ref_logps).is_file(), "dft.ref_logps",
                 f"{cfg.dft.ref_logps} does not exist")
        _require(cfg.model.init_from is not None, "model.init_from",
                 "dft.reference=offline scores the initial weights of a checkpoint; set model.init_from")
    _require(0 < cfg.data.max_prompt_length < cfg.data.max_length, "data.max_prompt_length",
             f"must be > 0 and below data.max_length={cfg.data.max_length}")
    _require(cfg.data.num_epochs >= 1, "data.num_epochs", "must be >= 1")
    _check_pack_length(cfg)
    _require(not check_files or Path(cfg.data.path).exists(), "data.path", f"{cfg.data.path} does not exist")
    if check_files and cfg.data.eval_path is not None:
        _require(Path(cfg.data.eval_path).exists(), "data.eval_path", f"{cfg.data.eval_path} does not exist")
    if check_files:
        _check_tokenizer(cfg)
    _require(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must lie in [0, 1)")
    _require(cfg.checkpoint.every_n_steps >= 0, "checkpoint.every_n_steps", "must be >= 0")
    from nemo_dft.platform.signals import parse_signals

    try:
        parse_signals(list(cfg.trainer.preemption_signals))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _require(cfg.log.wandb_mode in ("online", "offline"), "log.wandb_mode",
             f"{cfg.log.wandb_mode!r} is not online or offline")
    if cfg.log.wandb_project:
        import importlib.util

        _require(importlib.util.find_spec("wandb") is not None, "log.wandb_project",
                 "W&B logging needs the wandb package (pip install wandb)")
    _require(cfg.data.empty_answers in ("error", "drop", "keep"), "data.empty_answers",
             f"{cfg.data.empty_answers!r} is not error, drop or keep")
    _require(cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1, "trainer.max_steps",
             f"must be >= 1 (or null for every epoch), got {cfg.trainer.max_steps}")
    _require(cfg.trainer.val_check_interval is None or cfg.trainer.val_check_interval >= 1,
             "trainer.val_check_interval", f"must be >= 1 (or null), got {cfg.trainer.val_check_interval}")
    shape = known_model_shape(cfg)
    tp = m.tensor_model_parallel_size
    for field_name in ("num_attention_heads", "num_query_groups"):
        count = shape.get(field_name)
        if count is not None:
            _require(count % tp == 0, "model.tensor_model_parallel_size",
                     f"{tp} does not divide the model's {field_name}={count}")
    _require(cfg.trainer.nonfinite in ("stop", "skip"), "trainer.nonfinite",
             f"{cfg.trainer.nonfinite!r} is not stop or skip")
    _require(cfg.trainer.accelerator in ("auto", "cpu", "gpu"), "trainer.accelerator",
             f"{cfg.trainer.accelerator!r} is not auto, cpu or gpu")
    _validate_peft(cfg)


CHECKPOINT_CONTENTS = ("auto", "adapters", "full")  # peft.checkpoint


def checkpoint_contents(cfg: DictConfig) -> str:
    """What this run's checkpoints hold: ``adapters`` (a LoRA run whose base is reloaded from
    model.init_from) or ``full``; ``peft.checkpoint=auto`` is adapters exactly when there is a base."""
    if cfg.peft.scheme != "lora":
        return "full"
    if cfg.peft.checkpoint == "auto":
        return "adapters" if cfg.model.init_from is not None else "full"
    return cfg.peft.checkpoint


def _validate_peft(cfg: DictConfig) -> None:
    p = cfg.peft
    _require(p.scheme in (None, "lora"), "peft.scheme", f"{p.scheme!r} is not lora or null (full fine-tuning)")
    _require(p.checkpoint in CHECKPOINT_CONTENTS, "peft.checkpoint", f"{p.checkpoint!r} is not auto, adapters or full")
    if p.scheme is None:
        return
    tp = cfg.model.tensor_model_parallel_size
    _require(p.dim >= 1, "peft.dim", f"must be >= 1, got {p.dim}")
    _require(p.dim % tp == 0, "peft.dim",
             f"{p.dim} is not divisible by model.tensor_model_parallel_size={tp} (A is split over TP ranks)")
    _require(p.alpha > 0, "peft.alpha", f"must be > 0, got {p.alpha}")
    _require(0 <= p.dropout < 1, "peft.dropout", f"must lie in [0, 1), got {p.dropout}")
    targets = list(p.target_modules)
    _require(len(targets) > 0, "peft.target_modules", "is empty; name at least one of " + ", ".join(TARGET_MODULES))
    for name in targets:
        _require(name in TARGET_MODULES, "peft.target_modules",
                 f"{name!r} is not one of {', '.join(TARGET_MODULES)}")
    _require(len(set(targets)) == len(targets), "peft.target_modules", f"{targets} names a module twice")
    _require(p.checkpoint != "adapters" or cfg.model.init_from is not None, "peft.checkpoint",
             "adapters-only checkpoints reload the frozen base from model.init_from, which is not set (a random "
             "init cannot be reloaded); set model.init_from, or peft.checkpoint=full to save the base too")
