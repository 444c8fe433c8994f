"""LoRA adapters on a megatron GPT module through NeMo's ``llm.peft.LoRA`` transform, and the
adapter-free view of the same module.

NeMo's transform wraps each targeted linear layer (``linear_qkv``, ``linear_proj``, ``linear_fc1``,
``linear_fc2``; megatron's local layers on CPU, Transformer Engine's on GPU) in a ``LoRALinear``
whose output is ``W x + (alpha / dim) * B A x``.  It is applied here when the model is built, so
the optimizer and the gradient buffers see only the adapters; checkpoints carry the adapters alone
(``peft.checkpoint=adapters``, the base reloaded from ``model.init_from``, see
:mod:`nemo_dft.modeling.adapter_checkpoint`) or with the frozen base weights (``full``).

With the adapters switched off (:func:`adapters_disabled`) the module computes exactly the base
model: each wrapper returns its wrapped layer's output untouched.  Reference-based DFT scores its
reference that way, so no second copy of the weights is built.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_dft.config.training import TARGET_MODULES


@dataclass(frozen=True)
class LoRASettings:
    """``peft.*`` of the training config, for ``scheme=lora``."""

    dim: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    seed: int = 1234  # the adapters' A matrices, drawn per layer independently of TP/PP

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


def apply_lora(module: torch.nn.Module, settings: LoRASettings) -> int:
    """Freeze ``module`` and wrap its target layers with NeMo's LoRA adapters; returns how many.

    A starts from a seeded Xavier-normal draw per (global layer, projection), B from zero, so the
    adapted model equals the base one at step 0 and every TP/PP layout starts from the same adapters.
    """
    from nemo.collections.llm import fn
    from nemo.collections.llm.peft import LoRA

    lora = LoRA(target_modules=list(settings.target_modules), dim=settings.dim, alpha=settings.alpha,
                dropout=settings.dropout)
    lora._add_via_setattr = False  # set by NeMo's PEFT callback, which this path does not use
    module.requires_grad_(False)
    with _without_transformer_engine_probe():
        fn.walk(module, lora.transform)
    wrapped = named_wrappers(module)
    for name, wrapper in wrapped:
        _seeded_lora_a(wrapper.adapter.linear_in, name, settings.seed)
        wrapper.register_load_state_dict_pre_hook(_base_keys_under_to_wrap)
    return len(wrapped)


def _base_keys_under_to_wrap(wrapper, state_dict, prefix, *args) -> None:
    """A wrapper's state dict names the base layer's tensors as the unwrapped layer did (``weight``,
    not ``to_wrap.weight``), so checkpoints keep the base model's names; loading maps them back."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith(("adapter.", "to_wrap.")):
            state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)


@contextlib.contextmanager
def _without_transformer_engine_probe() -> Iterator[None]:
    """Let NeMo's transform run where Transformer Engine is not installed (CPU).

    Without TE, NeMo's LoRA module holds a placeholder that raises when its transform compares a
    layer's class with ``te.Linear``, and its PEFT utilities see megatron's stand-in TE classes
    (mocks, not types) as installed and fail in ``isinstance``.  For the transform alone, the
    placeholder becomes a class nothing is an instance of and the utilities are told TE is
    absent, so local layers take NeMo's megatron-layer path.  Where TE is installed nothing changes.
    """
    from nemo.collections.llm.peft import lora as nemo_lora
    from nemo.collections.llm.peft import utils as nemo_peft_utils

    if nemo_lora.HAVE_TE:
        yield
        return
    saved = nemo_lora.te, nemo_peft_utils.HAVE_TE

    class _NoTE:
        class Linear:  # never a module's class
            pass

    nemo_lora.te, nemo_peft_utils.HAVE_TE = _NoTE, False
    try:
        yield
    finally:
        nemo_lora.te, nemo_peft_utils.HAVE_TE = saved


def is_lora_wrapper(module: torch.nn.Module) -> bool:
    from nemo.collections.llm.peft.lora import LoRALinear

    return isinstance(module, LoRALinear)


def named_wrappers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The LoRA wrappers of ``module``, named by global layer number: ``"3.self_attention.linear_qkv"``."""
    found = []
    for _, layer in module.named_modules():
        number = getattr(layer, "layer_number", None)
        if number is None or not hasattr(layer, "self_attention"):
            continue  # not a transformer layer
        for sub_name, sub in layer.named_modules():
            if is_lora_wrapper(sub):
                found.append((f"{number}.{sub_name}", sub))
    return found


def has_lora(module: torch.nn.Module) -> bool:
    return any(is_lora_wrapper(m) for m in module.modules())


def _seeded_lora_a(linear_in: torch.nn.Module, name: str, seed: int) -> None:
    """This rank's shard of a full Xavier-normal A drawn from (seed, layer name)."""
    from megatron.core import parallel_state

    weight = linear_in.weight
    full_out = getattr(linear_in, "output_size", weight.shape[0])
    full_in = getattr(linear_in, "input_size", weight.shape[1])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = math.sqrt(2.0 / (full_in + full_out))
    full = torch.randn(full_out, full_in, generator=generator, dtype=torch.float32) * std
    rank = parallel_state.get_tensor_model_parallel_rank()
    if weight.shape[0] != full_out:  # column-parallel A: rows split over TP
        full = full.chunk(full_out // weight.shape[0])[rank]
    elif weight.shape[1] != full_in:  # row-parallel A: columns split over TP
        full = full.chunk(full_in // weight.shape[1], dim=1)[rank]
    with torch.no_grad():
        weight.copy_(full.to(weight.dtype))


def _base_forward(wrapper: torch.nn.Module, x: torch.Tensor, *args, **kwargs):
    output, bias, _ = wrapper.base_linear_forward(x, *args, **kwargs)
    return output, bias


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """``module`` as the base model: adapters bypassed, and in eval mode like a frozen reference
    (no dropout, no random draws); every wrapper and training flag is restored on exit."""
    import functools

    wrappers = [m for m in module.modules() if is_lora_wrapper(m)]
    modes = [(m, m.training) for m in module.modules()]
    for wrapper in wrappers:
        wrapper.forward = functools.partial(_base_forward, wrapper)
    module.eval()
    try:
        yield
    finally:
        for wrapper in wrappers:
            del wrapper.forward  # back to LoRALinear.forward
        for m, training in modes:
            m.training = training


class AdapterFreeReference(torch.nn.Module):
    """The frozen reference of LoRA-DFT: the policy's own module, called with its adapters off.

    Megatron's schedules find ``set_input_tensor`` and ``config`` through ``.module``, so it also
    runs as a pipeline stage (``nemo_dft.training.reference_pipeline``).
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.module = policy

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.module):
            return self.module(*args, **kwargs)


def lora_delta(wrapper: torch.nn.Module) -> torch.Tensor:
    """``(alpha / dim) * B @ A`` of an unsharded (TP = 1) wrapper, in fp32."""
    adapter = wrapper.adapter
    a = adapter.linear_in.weight.float()
    b = adapter.linear_out.weight.float()
    return (b @ a) * (adapter.alpha / adapter.dim)


def merge_adapters(module: torch.nn.Module) -> int:
    """Fold every adapter into its base weight (TP = 1) and put the plain layer back; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if not is_lora_wrapper(child):
                continue
            base = child.to_wrap
            with torch.no_grad():
                base.weight.add_(lora_delta(child).to(base.weight.dtype))
            if hasattr(base, "return_layernorm_output"):  # set by the transform on TE layers
                base.return_layernorm_output = False
            setattr(parent, child_name, base)
            count += 1
    return count


def lora_settings(cfg) -> LoRASettings | None:
    """The run's LoRA settings (``peft.*``), or None for full fine-tuning."""
    if cfg.peft.scheme != "lora":
        return None
    return LoRASettings(dim=int(cfg.peft.dim), alpha=float(cfg.peft.alpha), dropout=float(cfg.peft.dropout),
                        target_modules=tuple(cfg.peft.target_modules), seed=int(cfg.run.seed))


def checkpoint_has_adapters(checkpoint: str | Path) -> bool:
    """Whether a NeMo checkpoint directory holds LoRA adapter weights (read from its metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader

    weights = Path(checkpoint) / "weights"
    try:
        keys = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    except Exception:  # unreadable: the restore reports it
        return False
    return any(".adapter." in key for key in keys)
