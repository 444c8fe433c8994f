"""Score every negative a DFT training run will use under the reference model (positives are not
scored: the loss never reads their reference log-probs),
once, so that training can run with dft.reference=offline instead of holding a frozen copy.

Takes the training config (same --config file and key=value overrides as train_dft.py); the
reference weights are model.init_from.  The layout (trainer.devices, model.tensor_model_parallel_size,
model.pipeline_model_parallel_size, model.micro_batch_size) may differ from training's.

Extra keys:
  output=PATH              the file to write (default: <run.dir>/ref_logps.parquet)
  groups_per_shard=N       groups per partial shard (default 1024); an interrupted pass resumes
                           from the shards in PATH.partial/

Console: NeMo, Megatron and Lightning messages go to <run.dir>/logs/console/rank0.log (--verbose
prints them too).

Then train with:  dft.reference=offline dft.ref_logps=PATH
The file records a fingerprint of the data, tokenizer, chat template, truncation settings,
negative columns and checkpoint; training refuses a file whose fingerprint differs.

Exit codes: 0 written, 2 configuration error, 75 stopped by SIGTERM/SIGUSR1/SIGINT (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys

EXTRA_KEYS = ("output", "groups_per_shard")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from nemo_dft.config.loading import config_argument_parser

    description, epilog = __doc__.split("\n\n", 1)
    return config_argument_parser(description, epilog).parse_args(argv)


def split_extra(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    extra, rest = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in EXTRA_KEYS:
            extra[key] = value
        else:
            rest.append(item)
    return extra, rest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nemo_dft.platform import console

    console.configure(None, verbose=args.verbose)  # library messages are kept until run.dir is known
    from omegaconf import OmegaConf

    from nemo_dft.config.training import ConfigError, TrainConfig, data_parallel_size, load_structured, validate

    extra, overrides = split_extra(args.overrides)
    try:
        cfg = load_structured(TrainConfig, args.config, overrides)
        # The pass only needs the data, model and layout keys: no reference to load, and one
        # micro-batch per data-parallel rank per step.
        cfg.dft.ref_free, cfg.dft.objective = True, "dft2"  # the objective does not matter to the pass
        cfg.model.global_batch_size = cfg.model.micro_batch_size * max(data_parallel_size(cfg), 1)
        validate(cfg)
        if not cfg.model.init_from:
            raise ConfigError("model.init_from: the checkpoint whose weights are the reference must be set")
        from nemo_dft.modeling.adapter_checkpoint import refuse_adapter_only_init_from

        refuse_adapter_only_init_from(cfg.model.init_from)  # it has no weights of its own to score with
        groups_per_shard = int(extra.get("groups_per_shard", 1024))
        if groups_per_shard < 1:
            raise ConfigError("groups_per_shard: must be >= 1")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = extra.get("output") or f"{cfg.run.dir}/ref_logps.parquet"
    if args.print_config:
        print(OmegaConf.to_yaml(cfg) + f"output: {output}\ngroups_per_shard: {groups_per_shard}")
        return 0
    log_file = console.configure(cfg.run.dir, verbose=args.verbose)
    if console.process_rank() == 0 and not args.verbose:
        print(f"scoring {cfg.data.path} with {cfg.model.init_from} into {output}; library messages: {log_file}",
              flush=True)
    from nemo_dft.platform.signals import EXIT_PREEMPTED, parse_signals
    from nemo_dft.reference.scoring import ScoringInterrupted, score

    try:
        result = score(cfg, output, groups_per_shard, parse_signals(list(cfg.trainer.preemption_signals)))
    except ScoringInterrupted:
        print(f"scoring stopped by a signal; finished shards are kept in {output}.partial/, rerun to resume",
              file=sys.stderr)
        return EXIT_PREEMPTED
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print("\nreference log-probs: " + json.dumps({
            "output": str(result.output), "rows": result.rows, "scored_groups": result.scored_groups,
            "resumed_groups": result.resumed_groups,
        }, indent=2))
    return 0


if __name__ == "__main__":
    from nemo_dft.platform.exit import exit_after_cleanup

    exit_after_cleanup(main())  # without the 3 s teardown of NeMo's modules (nemo_dft/platform/exit.py)
