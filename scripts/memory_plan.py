"""Print the per-GPU memory of a training config and layout before queueing it.

  python scripts/memory_plan.py --config conf/dft_mistral.yaml [key=value ...] [--gpu-gb 80] [--vocab N]

Weights, gradients, fp32 main weights, Adam moments, the frozen reference, activations (with LoRA
also the adapters') and logits, from the model's NeMo config (layers, hidden size, parameter
count), peft.* and the run's layout; the formulas are in nemo_dft/training/memory_plan.py.  With
model.preset=checkpoint the shape is read from model.init_from.  Exit 2 on a configuration error.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from nemo_dft.config.loading import config_argument_parser

    parser = config_argument_parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                    prog="memory_plan.py")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="tokenizer vocabulary, padded as NeMo pads it (default: the model config's own "
                             "vocab_size, e.g. Qwen's, else 32000 as Mistral/Llama-2)")
    args = parser.parse_args(argv)
    from nemo_dft.config.training import ConfigError, load_config, uses_pack_length

    try:
        # a kernel flag that changes no memory: off, so that configs whose preset asks for it (Llama's)
        # also build where Transformer Engine is not installed (planning on a laptop)
        cfg = load_config(args.config, ["model.config.apply_rope_fusion=false", *args.overrides], check_files=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from nemo_dft.modeling.gpt_config import make_gpt_config
    from nemo_dft.training.memory_plan import format_plan, memory_per_gpu, plan_for_run

    try:
        gpt = make_gpt_config(cfg, on_gpu=True)
    except ConfigError as err:  # e.g. model.preset=checkpoint with a model.init_from not readable here
        hint = ("; to plan without the checkpoint, give its shape: model.preset=null and model.config.<field> "
                "(docs/cluster.md, 6b)") if cfg.model.preset == "checkpoint" else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    shape, layout = plan_for_run(cfg, gpt, args.vocab)
    per_micro_batch = (f"one packed row of {layout.sequence_length} positions (data.pack_length)"
                       if uses_pack_length(cfg) else
                       f"{layout.micro_batch_prompts} prompts x {layout.sequences_per_prompt} sequences x "
                       f"{layout.sequence_length} tokens")
    adapters = "" if shape.adapters is None else (
        f" + {shape.adapters.parameters / 1e6:.1f}M LoRA adapters (rank {cfg.peft.dim})")
    print(f"{shape.parameters / 1e9:.2f}B parameters{adapters}, TP={layout.tensor_parallel} "
          f"PP={layout.pipeline_parallel} DP={layout.data_parallel}, {per_micro_batch} per micro-batch; per GPU:")
    print(format_plan(memory_per_gpu(shape, layout), args.gpu_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
