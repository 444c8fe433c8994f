"""Rewrite a NeMo 2 checkpoint at another tensor/pipeline-parallel size (test helper).

Run under ``torchrun --nproc_per_node TP*PP``: every rank loads its shard of ``SRC`` (megatron
reshards on load) and the ranks save ``DST`` together, as a TP/PP training run would.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    from nemo_dft.convert.cpu import apply_cpu_model_overrides, on_cpu, prepare_process

    prepare_process()
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo import lightning as nl
    from nemo.lightning import _strategy_lib, io
    from nemo.lightning.io.connector import ModelConnector

    model = io.load_context(args.src, subpath="model")
    model.config.perform_initialization = False
    if on_cpu():
        apply_cpu_model_overrides(model.config)
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        pipeline_dtype=model.config.params_dtype,
        ddp="pytorch",
        setup_optimizers=False,
        ckpt_save_optimizer=False,
    )
    trainer = nl.Trainer(
        devices=args.tp * args.pp,
        accelerator="cpu",
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    with _strategy_lib.megatron_cpu_init_context(model.config):
        model.configure_model()
    trainer.strategy.setup(trainer)
    trainer.strategy.load_checkpoint(args.src)
    trainer.state.fn = TrainerFn.FITTING  # NeMo saves full checkpoints only while "fitting"
    ModelConnector(args.dst).nemo_save(args.dst, trainer)


if __name__ == "__main__":
    main()
