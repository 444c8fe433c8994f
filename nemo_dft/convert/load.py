"""Loading a NeMo 2 checkpoint directory into a model, for export and for logit checks.

This mirrors ``ModelConnector.nemo_load`` (single device, TP=PP=1, which reshards checkpoints
saved at any TP/PP) but applies the CPU overrides before the model is built, which
``nemo_load`` offers no hook for.  Without them a CPU process that also builds a model with the
overrides (the trainer, or a logit check) fails megatron's attention-backend consistency check.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from nemo_dft.convert.cpu import apply_cpu_model_overrides, on_cpu, prepare_process
from nemo_dft.convert.mapping import unwrap_module


def load_nemo_model(
    nemo_dir: str | Path, on_gpu: bool = False, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """The checkpoint's model (its own ``GPTModel`` subclass) with weights, and its trainer.

    Pass both to ``nemo.lightning.teardown`` when done.  ``dtype`` casts the weights after loading.
    An adapter-only LoRA checkpoint (``peft.checkpoint=adapters``) takes its base weights from the
    ``model.init_from`` it recorded, after checking that that is still the base it was trained on.
    On a machine without a GPU the CPU shim is enabled first (a caller that had not enabled it got
    megatron's "torch.cuda.Stream requires CUDA support" from the strategy's set-up).
    """
    if not on_gpu:
        prepare_process()
    base = adapter_checkpoint_base(nemo_dir)
    from nemo import lightning as nl
    from nemo.lightning import _strategy_lib, io

    model = io.load_context(str(nemo_dir), subpath="model")
    model.config.perform_initialization = False
    model.config.fp8 = None
    model.config.fp8_param = False
    if on_cpu():
        apply_cpu_model_overrides(model.config)
    trainer = nl.Trainer(
        devices=1,
        accelerator="gpu" if on_gpu else "cpu",
        strategy=nl.MegatronStrategy(ddp="pytorch", setup_optimizers=False),
        logger=False,
        enable_checkpointing=False,
    )
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    init = contextlib.nullcontext() if on_gpu else _strategy_lib.megatron_cpu_init_context(model.config)
    with init:
        model.configure_model()
    trainer.strategy.setup(trainer)
    with _base_from(trainer.strategy.checkpoint_io, base):
        trainer.strategy.load_checkpoint(str(nemo_dir))
    if dtype is not None:
        unwrap_module(model).to(dtype)
    return model.eval(), trainer


def adapter_checkpoint_base(nemo_dir: str | Path) -> Path | None:
    """The checked base of an adapter-only checkpoint (None for one that holds every weight)."""
    from nemo_dft.config.loading import ConfigError
    from nemo_dft.convert.errors import ConfigMismatchError
    from nemo_dft.modeling.adapter_checkpoint import check_recorded_base

    try:
        return check_recorded_base(nemo_dir)
    except ConfigError as err:
        raise ConfigMismatchError(str(err).removeprefix("model.init_from: ")) from err


@contextlib.contextmanager
def _base_from(io: Any, base: Path | None):
    """While loading an adapter-only checkpoint, fill its base keys from ``base``."""
    if base is None:
        yield
        return
    from nemo_dft.modeling.adapter_checkpoint import load_adapters_and_base

    load = io.load_checkpoint
    io.load_checkpoint = lambda path, sharded_state_dict=None, **kwargs: load_adapters_and_base(
        load, path, base, sharded_state_dict, **kwargs)
    try:
        yield
    finally:
        del io.load_checkpoint  # back to the class's method
