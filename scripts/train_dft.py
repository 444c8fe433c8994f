"""Train a model with Discriminative Fine-Tuning (DFT / DFT2) on NeMo/Megatron.

With no arguments it trains the embedded tiny default: a tiny Mistral-architecture model on the
copy task shipped in nemo_dft/demo/assets, on CPU, and prints a summary.

Main keys (dotted overrides, e.g. dft.ref_free=true model.tensor_model_parallel_size=2):
  run.dir, run.seed                        output directory (metrics.jsonl, checkpoints), seed
  trainer.devices, trainer.num_nodes       processes per node (on one node started by this script;
                                           torchrun works too) and nodes (torchrun or Slurm)
  trainer.max_steps                        default: all epochs of data.num_epochs
  trainer.val_check_interval               held-out evaluation every N steps (default: before and after)
  trainer.progress_bar                     true | false
  model.arch                               mistral | llama | qwen2 | qwen3 | gpt (preset=null: Mistral-7B,
                                           Llama-2-7B, Qwen2.5-7B, Qwen3-8B)
  model.init_from                          NeMo checkpoint with the initial weights (default: random init)
  model.preset                             tiny (the demo shape) | null (the architecture's own, e.g. Mistral-7B)
  model.tensor_model_parallel_size, model.pipeline_model_parallel_size
  model.micro_batch_size, model.global_batch_size   counted in prompts (1 + m sequences each)
  model.precision                          fp32 | bf16 | fp16
  model.fp8, model.fp8_recipe              null | hybrid | e4m3; delayed | tensorwise | blockwise | mxfp8 (GPU, TE)
  model.config.<field>                     any field of the NeMo GPT config (num_layers, hidden_size, ...)
  tokenizer.path                           HF tokenizer directory
  tokenizer.chat_template                  null (the tokenizer's own) | zephyr | alpaca | a Jinja template
  optim.lr, optim.min_lr                   learning rate; end of the cosine decay (default: optim.lr / 10)
  optim.warmup_ratio, optim.weight_decay, optim.clip_grad
  dft.objective                            dft (default) | dft2 (= dft.ref_free=true) | sft (the baseline:
                                           token-mean NLL of the positives; dft.num_negatives=0: no negatives needed)
  dft.num_negatives, dft.tau, dft.gamma, dft.u_init, dft.ref_free, dft.per_epoch_negatives
  dft.reference, dft.ref_logps             frozen (on the fly) | offline (file from precompute_ref_logps.py)
  data.path, data.eval_path, data.num_epochs, data.max_length, data.max_prompt_length
  data.shuffle, data.add_bos               shuffle each epoch; prepend BOS where the template does not
  checkpoint.every_n_steps                 0: only at the end; a rerun with the same run.dir resumes
  trainer.preemption_signals               default [SIGTERM, SIGUSR1, SIGINT]: checkpoint after the step, exit 75
                                           (a second Ctrl-C exits at once, code 130)
  trainer.nonfinite                        stop (default, exit 3) | skip: a step with NaN/inf loss, u or gradient
  trainer.val_check_interval               held-out evaluation every N steps (always before and after); eval.jsonl
  log.tensorboard                          default true: event files in run.dir/tensorboard/
  log.wandb_project, log.wandb_mode        W&B when a project is set: online | offline (files in run.dir/wandb/)

Console: the key settings, the progress bar, warnings that matter and the summary; NeMo, Megatron
and Lightning messages go to <run.dir>/logs/console/rank0.log (--verbose prints them too).

A rerun of a finished run.dir is a no-op (exit 0); one process tree per run.dir (run.dir/.lock).

Exit codes: 0 trained (or already finished), 2 configuration error (or run.dir in use), 3 stopped
at a non-finite loss/u/gradient (trainer.nonfinite=stop), 75 stopped by a signal with a checkpoint
saved (rerun with the same run.dir to resume), anything else a failure.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from nemo_dft.config.loading import config_argument_parser

    description, epilog = __doc__.split("\n\n", 1)
    return config_argument_parser(description, epilog).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nemo_dft.platform import console

    console.configure(None, verbose=args.verbose)  # library messages are kept until run.dir is known
    from omegaconf import OmegaConf

    from nemo_dft.config.training import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from nemo_dft.training.train import read_checked_rows

    try:
        rows = read_checked_rows(cfg)  # before anything is written to run.dir
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from nemo_dft.training.run_lock import RunDirLock

    lock = RunDirLock(cfg.run.dir) if console.process_rank() == 0 else None  # rank 0 speaks for the run
    try:
        if lock is not None:
            warning = lock.acquire()  # before anything is written to run.dir
            if warning:
                print(warning, file=sys.stderr, flush=True)
        return run(args, cfg, rows)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()  # success, exit 75, 2, 3 and errors alike


def run(args: argparse.Namespace, cfg, rows: dict[str, list[dict]]) -> int:
    """Train (or resume) under the run.dir lock; a run that already reached its final step is a no-op."""
    from pathlib import Path

    from nemo_dft.platform import console
    from nemo_dft.training.finished_run import finished_run
    from nemo_dft.training.train import train

    finished = finished_run(Path(cfg.run.dir).resolve(), cfg, len(rows["data.path"]))
    if finished is not None:
        if console.process_rank() == 0:
            print(f"run.dir {cfg.run.dir} finished at step {finished.step}; nothing to do", flush=True)
        return 0
    from nemo_dft.config.summary import key_settings

    log_file = console.configure(cfg.run.dir, verbose=args.verbose)
    if console.process_rank() == 0:
        print("DFT " + "\n    ".join(key_settings(cfg)), flush=True)
        if not args.verbose:
            print(f"    library messages: {log_file} (--verbose prints them here)", flush=True)
    from nemo_dft.training.nonfinite import EXIT_NONFINITE, NonFiniteStep

    try:
        result = train(cfg, rows)
    except NonFiniteStep as err:
        print(f"error: {err}; the step was not applied and no checkpoint holds it; set "
              "trainer.nonfinite=skip to skip such steps", file=sys.stderr)
        return EXIT_NONFINITE
    import torch.distributed as dist

    from nemo_dft.platform.signals import EXIT_PREEMPTED

    if result.preempted:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"\nDFT stopped by a signal after step {result.steps} with a checkpoint in {result.run_dir}; "
                  f"run again with the same run.dir to resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "heldout_rank_acc_before": result.eval_before and result.eval_before["rank_acc"],
            "heldout_rank_acc_after": result.eval_after and result.eval_after["rank_acc"],
            "seconds": round(result.seconds, 1),
            "run_dir": str(result.run_dir),
        }
        print("\nDFT summary: " + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    from nemo_dft.platform.exit import exit_after_cleanup

    exit_after_cleanup(main())  # without the 3 s teardown of NeMo's modules (nemo_dft/platform/exit.py)
