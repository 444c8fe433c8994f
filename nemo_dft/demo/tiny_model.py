"""Tiny tokenizer and random-init HF checkpoints, built locally and cached.

No model hub is reachable from CI, so the demo, the tests and the conversion checks use a
byte-level BPE tokenizer trained on the embedded task and small random Mistral/Llama/Qwen2/Qwen3 models
(head_dim 32, which vLLM's CPU attention also accepts).  They are written atomically under a
build directory and reused when present.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from nemo_dft.data.chat_template import ZEPHYR_CHAT_TEMPLATE
from nemo_dft.data.io import make_group_readable, umask
from nemo_dft.demo.tiny_task import ASSET_DIR

DEFAULT_BUILD_DIR = Path(os.environ.get("NEMO_DFT_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Shapes of the tiny Mistral-architecture model: GQA (4 heads, 2 KV groups), RoPE, SwiGLU,
# RMSNorm, untied embeddings.  Shared by the HF builder and the NeMo model config.
TINY_MISTRAL_SHAPE = {
    "num_layers": 2,
    "hidden_size": 128,
    "ffn_hidden_size": 384,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": 32,
    "seq_length": 256,
    # the tiny HF model has no sliding window; without this the preset would keep NeMo's Mistral
    # window ([4096, 0]) and an export would say sliding_window: 4097 where the HF model says null
    "window_size": None,
}


def atomic_dir(
    target: Path,
    build: Callable[[Path], None],
    problem: Callable[[Path], str | None] | None = None,
) -> Path:
    """Build into a temporary sibling directory, then rename it into place.

    An existing ``target`` is reused, unless ``problem(target)`` names something wrong with it
    (a damaged or stale cache): then it is moved aside, removed and built again, so that a
    broken directory is never used and readers never see a half-built one.
    """
    if target.exists():
        reason = problem(target) if problem is not None else None
        if reason is None:
            return target
        print(f"{target}: {reason}; rebuilding it", file=sys.stderr, flush=True)
        _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        reason = problem(tmp) if problem is not None else None
        if reason is not None:
            raise RuntimeError(f"{target}: the build came out incomplete ({reason}); nothing was installed")
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the build is for the whole group
        make_group_readable(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _discard(target: Path) -> None:
    """Rename ``target`` out of the way (atomic), then delete it; another process may race us."""
    aside = target.with_name(f".{target.name}.discarded-{os.getpid()}")
    try:
        os.replace(target, aside)
    except FileNotFoundError:
        return  # someone else moved it first
    shutil.rmtree(aside, ignore_errors=True)


def _task_corpus() -> Iterator[str]:
    for split in ("train.jsonl", "heldout.jsonl"):
        with open(ASSET_DIR / split, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                for key, chat in row.items():
                    if key == "id":
                        continue
                    for message in chat:
                        yield f"<|{message['role']}|>\n{message['content']}"
    yield "<|system|>\nYou are an unhelpful assistant."
    yield "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def build_tiny_tokenizer(out_dir: Path) -> None:
    """Train a 512-token byte-level BPE on the task text and save it as an HF tokenizer."""
    train_bpe_tokenizer(_task_corpus(), out_dir)


def train_bpe_tokenizer(corpus: Iterable[str], out_dir: Path, vocab_size: int = TINY_VOCAB_SIZE) -> None:
    """A byte-level BPE of exactly ``vocab_size`` tokens trained on ``corpus``, saved as an HF
    tokenizer with the zephyr chat template (bytes it never saw still encode, one token each)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Reserve the rest of the vocabulary, so that it is exactly TINY_VOCAB_SIZE: the padded
    # vocabulary is then the same at every tensor-parallel size and checkpoints reshard.
    unused = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<unused_{i}>" for i in range(unused)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_input_names=["input_ids", "attention_mask"],  # decoder-only: no token_type_ids
    )
    fast.chat_template = ZEPHYR_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def tiny_tokenizer_dir(build_dir: Path | None = None) -> Path:
    """Path of the cached tiny tokenizer, building it on first use."""
    return atomic_dir(Path(build_dir or DEFAULT_BUILD_DIR) / "tiny-tokenizer", build_tiny_tokenizer)


def _hf_classes(arch: str) -> tuple[type, type]:
    """transformers' own config and model classes of a tiny architecture."""
    import transformers

    names = {
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    if arch not in names:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(names)}")
    config_name, model_name = names[arch]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def build_tiny_hf_model(
    out_dir: Path,
    arch: str = "mistral",
    seed: int = 0,
    tie_embeddings: bool = False,
    extra_config: dict | None = None,
) -> None:
    """Save a random-init HF causal LM of the tiny shape, with the tiny tokenizer beside it.

    ``extra_config`` adds HF config keys (e.g. a Llama 3.1 ``rope_scaling``).  Norm weights and
    biases (Qwen2's q/k/v) are random too, so that a dropped one cannot go unseen.
    """
    import torch
    from transformers import AutoTokenizer

    shape = TINY_MISTRAL_SHAPE
    common = {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["ffn_hidden_size"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_query_groups"],
        "head_dim": shape["kv_channels"],
        "max_position_embeddings": shape["seq_length"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config_cls, model_cls = _hf_classes(arch)
    extra = {"sliding_window": None} if arch == "mistral" else {}
    if arch in ("qwen2", "qwen3"):  # full attention in every layer, as Qwen's released configs say
        extra.update(use_sliding_window=False, max_window_layers=shape["num_layers"])
    if arch == "qwen2":
        del common["head_dim"]  # Qwen2 derives it: hidden_size / num_attention_heads = 32
    extra.update(extra_config or {})
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):  # HF initialises biases to zero
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir())).save_pretrained(str(out_dir))


def tiny_hf_model_dir(arch: str = "mistral", build_dir: Path | None = None) -> Path:
    """Path of the cached tiny HF checkpoint of ``arch``, building it on first use."""
    root = Path(build_dir or DEFAULT_BUILD_DIR)
    return atomic_dir(root / f"tiny-{arch}-hf", lambda out: build_tiny_hf_model(out, arch))
