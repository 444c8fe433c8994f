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
    On a machine without a GPU the CPU shim is enabled first (a caller that had not enabled it got
    megatron's "torch.cuda.Stream requires CUDA support" from the strategy's set-up).
    """
    if not on_gpu:
        prepare_process()
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
    trainer.strategy.load_checkpoint(str(nemo_dir))
    if dtype is not None:
        unwrap_module(model).to(dtype)
    return model.eval(), trainer
