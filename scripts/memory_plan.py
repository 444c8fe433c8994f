"""Print the per-GPU memory of a training config and layout before queueing it.

  python scripts/memory_plan.py --config conf/dft_mistral.yaml [key=value ...] [--gpu-gb 80]

Weights, gradients, fp32 main weights, Adam moments, the frozen reference, activations and logits,
from the model's NeMo config (layers, hidden size, parameter count) and the run's layout; the
formulas are in nemo_dft/training/memory_plan.py.  Exit 2 on a configuration error.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from nemo_dft.config.loading import config_argument_parser

    parser = config_argument_parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                    prog="memory_plan.py")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000, Mistral/Llama-2)")
    args = parser.parse_args(argv)
    from nemo_dft.config.training import ConfigError, data_parallel_size, load_config, uses_pack_length

    try:
        cfg = load_config(args.config, args.overrides, check_files=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from nemo_dft.modeling.gpt_config import make_gpt_config
    from nemo_dft.training.memory_plan import Layout, ModelShape, format_plan, memory_per_gpu

    gpt = make_gpt_config(cfg, on_gpu=True)
    shape = ModelShape(parameters=parameter_count(gpt, args.vocab), layers=gpt.num_layers, hidden=gpt.hidden_size,
                       vocab=args.vocab)
    m, dp = cfg.model, data_parallel_size(cfg)
    # a micro-batch: micro_batch_size groups of 1 + m sequences padded to max_length (a packed row of
    # the same groups is no longer), or with data.pack_length one row of pack_length positions, at most
    # one row per prompt of the step
    rows = uses_pack_length(cfg)
    layout = Layout(
        tensor_parallel=m.tensor_model_parallel_size, pipeline_parallel=m.pipeline_model_parallel_size,
        data_parallel=dp, micro_batch_prompts=1 if rows else m.micro_batch_size,
        sequences_per_prompt=1 if rows else 1 + cfg.dft.num_negatives,
        sequence_length=cfg.data.pack_length if rows else cfg.data.max_length,
        micro_batches_per_step=m.global_batch_size // (dp if rows else m.micro_batch_size * dp),
        precision=m.precision, distributed_optimizer=m.use_distributed_optimizer,
        grad_reduce_in_fp32=m.grad_reduce_in_fp32,
        frozen_reference=not cfg.dft.ref_free and cfg.dft.reference == "frozen",
        recompute=m.recompute_granularity, sequence_parallel=m.sequence_parallel,
    )
    per_micro_batch = (f"one packed row of {layout.sequence_length} positions (data.pack_length)" if rows else
                       f"{layout.micro_batch_prompts} prompts x {layout.sequences_per_prompt} sequences x "
                       f"{layout.sequence_length} tokens")
    print(f"{shape.parameters / 1e9:.2f}B parameters, TP={layout.tensor_parallel} PP={layout.pipeline_parallel} "
          f"DP={dp}, {per_micro_batch} per micro-batch; per GPU:")
    print(format_plan(memory_per_gpu(shape, layout), args.gpu_gb))
    return 0


def parameter_count(gpt, vocab: int) -> int:
    """Parameters of a GPT config: attention (GQA), the MLP (gated: 3 matrices), norms, embeddings."""
    h, layers = gpt.hidden_size, gpt.num_layers
    head_dim = gpt.kv_channels or h // gpt.num_attention_heads
    groups = gpt.num_query_groups or gpt.num_attention_heads
    attention = h * gpt.num_attention_heads * head_dim * 2 + h * 2 * groups * head_dim
    mlp = (3 if gpt.gated_linear_unit else 2) * h * gpt.ffn_hidden_size
    embeddings = vocab * h * (1 if gpt.share_embeddings_and_output_weights else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


if __name__ == "__main__":
    sys.exit(main())
