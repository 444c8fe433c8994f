"""Device and Megatron strategy set-up shared by training and the scoring pass.

GPU runs never touch the CPU shim: :func:`enable_device` imports it only when no GPU is used.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from nemo_dft.config.loading import ConfigError
from nemo_dft.platform.memory import check_sequence_parallel_supported
from nemo_dft.platform.precision import check_fp8_supported


def use_gpu(cfg: DictConfig) -> bool:
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: 'gpu' was requested but torch sees no CUDA device")
    return cfg.trainer.accelerator != "cpu" and torch.cuda.is_available()


def enable_device(cfg: DictConfig) -> bool:
    """True on GPU; on CPU, turn on the CPU compatibility shim (the only place it is used)."""
    on_gpu = use_gpu(cfg)
    check_fp8_supported(cfg.model, on_gpu)
    try:
        check_sequence_parallel_supported(cfg.model, on_gpu)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not on_gpu:
        from nemo_dft.platform.cpu_shim import enable_cpu_compat

        enable_cpu_compat()
    return on_gpu


def slurm_plugins() -> list:
    """Under Slurm, Lightning would save its own checkpoint and requeue on SIGUSR1 from inside the
    signal handler; nemo_dft.training.preemption does that at a step boundary instead."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def make_strategy(cfg: DictConfig, gpt_config, on_gpu: bool, strategy_class: type | None = None, ddp=None):
    """NeMo's Megatron strategy for the run's layout.

    ``strategy_class``: a subclass, e.g. training's strategy that also checkpoints RNG state
    (default ``nl.MegatronStrategy``); ``ddp``: megatron's DDP config (default: fp32 gradient
    buffers, no distributed optimizer, as a forward-only pass needs).
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    strategy_class = strategy_class or nl.MegatronStrategy
    if ddp is None:
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
    return strategy_class(
        tensor_model_parallel_size=cfg.model.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.model.pipeline_model_parallel_size,
        context_parallel_size=cfg.model.context_parallel_size,
        pipeline_dtype=gpt_config.params_dtype,
        ddp=ddp,
        # a distributed-optimizer checkpoint stays loadable at another data-parallel size
        ckpt_optim_fully_reshardable=ddp.use_distributed_optimizer,
        process_group_backend=None if on_gpu else "gloo",
        ckpt_async_save=False,
        ckpt_parallel_load=False,
        save_ckpt_format="torch_dist",
    )
