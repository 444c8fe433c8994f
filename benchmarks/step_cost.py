"""Cost of one DFT optimizer step through the trainer: nemo_dft's layouts against the paper trainer's pattern.

    .venv/bin/python benchmarks/step_cost.py [--rounds 3] [--steps 8] [--scale 0.125] [--out FILE]

Every nemo_dft variant is ``scripts/train_dft.py`` itself, one process per run, same model shape,
initial weights (``run.seed``), data and steps; throughput comes from the run's own ``metrics.jsonl``
over the steps after the second:

- ``padded``: micro-batches of ``--micro-batch`` prompts (default 4, the paper trainer's) padded to
  the longest (rounded up to 8);
- ``packed``: ``data.packing=true`` at PP = 1, the micro-batch's sequences end to end in one row;
- ``packed_rows``: ``data.packing=true data.pack_length=L``, the layout pipeline parallelism trains
  (rows of exactly L positions, one per micro-batch), here at PP = 1;
- ``dft2_packed``: ``packed`` with ``dft.objective=dft2`` (no reference forward);
- ``paper`` (the baseline): the paper trainer's pattern, written with HF transformers in this
  process's child: micro-batches of 4 prompts, [positive; negatives] padded to the micro-batch's
  longest sequence, a frozen reference forward over every row.  The trainer cannot run this
  pattern (it never scores positives with the reference, and never pads a group to 4 prompts), so
  this re-implementation stays, on the same tokenized groups in the trainer's order.

A run is: a Mistral-shaped model (hidden 512, 4 layers, GQA 8/4, fp32, 1 thread), 8 prompts per
step, m = 2, the frozen reference, lengths of the issue-15 UltraFeedback-like distribution
(nemo_dft.data.lengths) scaled by ``--scale``, as letters the tiny tokenizer reads one token each.
``padded``, ``packed`` and ``dft2_packed`` take the same ``--micro-batch`` prompts per forward as
the paper pattern by default; ``--micro-batch 2`` gives padding its better setting here (a smaller
micro-batch pads less).  Variants alternate within each of ``--rounds`` rounds (the order reversed
every other round); the machine's load average is printed before each run.  Reported per variant:
the median over rounds of real tokens/s (the step's input positions of real sequences), processed
tokens/s (positions the policy computes, padding included), the real fraction and the peak RSS of
the run's process; the ratios of medians, and the per-round (paired) ratios.  ``--out FILE`` writes them as JSON.
``--small`` swaps in a 2-layer, hidden-64 model (the smoke test's; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER_VARIANTS = ("padded", "packed", "packed_rows", "dft2_packed")
VARIANTS = (*TRAINER_VARIANTS, "paper")
SHAPE = {"hidden_size": 512, "num_layers": 4, "ffn_hidden_size": 1536, "num_attention_heads": 8,
         "num_query_groups": 4, "kv_channels": 64}
SMALL_SHAPE = {**SHAPE, "hidden_size": 64, "num_layers": 2, "ffn_hidden_size": 128, "num_attention_heads": 4,
               "num_query_groups": 2, "kv_channels": 16}
PROMPTS_PER_STEP, NUM_NEGATIVES, SEED = 8, 2, 1234
PAPER_MICRO = 4  # the paper trainer's prompts per micro-batch; packed_rows: as many prompts as fit a row
WARMUP_STEPS = 2  # the first two steps are not timed
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE_TOKENS = 8  # the tiny tokenizer's chat template around a prompt


def lengths(scale: float) -> tuple[int, int]:
    """(data.max_length, data.max_prompt_length) of the distribution at ``scale``."""
    return max(2, round(1024 * scale)), max(1, round(512 * scale))


def pack_length(scale: float) -> int:
    """data.pack_length of packed_rows: three longest sequences per row, rounded up to 8."""
    return -(-3 * (lengths(scale)[0] - 1) // 8) * 8


def make_data(path: Path, groups: int, scale: float, seed: int = 0) -> None:
    """Rows whose sequences have the distribution's lengths: single letters, one token each."""
    from nemo_dft.data.io import write_text_atomic
    from nemo_dft.data.lengths import group_token_lengths

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(LETTERS) for _ in range(max(1, n)))

    rows = []
    for index, (prompts, responses) in enumerate(group_token_lengths(groups, NUM_NEGATIVES, scale=scale, seed=seed)):
        prompt = words(prompts[0] - TEMPLATE_TOKENS)
        row = {"id": index, "real": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": words(responses[0])}]}
        for k in range(NUM_NEGATIVES):
            row[f"generated_{k}"] = [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": words(responses[k + 1])}]
        rows.append(json.dumps(row) + "\n")
    write_text_atomic(path, "".join(rows))


def trainer_args(variant: str, data: Path, run_dir: Path, steps: int, scale: float, small: bool,
                 micro_batch: int = PAPER_MICRO) -> list[str]:
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    max_length, max_prompt_length = lengths(scale)
    args = [f"run.dir={run_dir}", f"data.path={data}", f"tokenizer.path={tiny_tokenizer_dir()}",
            "data.eval_path=null", "data.num_epochs=1", f"trainer.max_steps={steps}", "trainer.progress_bar=false",
            f"model.micro_batch_size={micro_batch}", f"model.global_batch_size={PROMPTS_PER_STEP}",
            f"data.max_length={max_length}", f"data.max_prompt_length={max_prompt_length}", f"run.seed={SEED}",
            "dft.reference=frozen", "log.tensorboard=false", "checkpoint.every_n_steps=0",
            *(f"model.config.{k}={v}" for k, v in (SMALL_SHAPE if small else SHAPE).items())]
    if variant != "padded":
        args.append("data.packing=true")
    if variant == "packed_rows":
        args.append(f"data.pack_length={pack_length(scale)}")
    if variant == "dft2_packed":
        args += ["dft.objective=dft2", "dft.tau=0.3", "dft.gamma=0.9"]
    return args


def trainer_result(run_dir: Path) -> dict:
    """Throughput of the timed steps from the run's metrics.jsonl."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [m for m in metrics if m["step"] > WARMUP_STEPS]
    if not timed:
        raise SystemExit(f"{run_dir}: no step after the first {WARMUP_STEPS} in metrics.jsonl")
    seconds = sum(m["step_s"] for m in timed)
    real = sum(m["tokens_per_s"] * m["step_s"] for m in timed)
    processed = sum(m["processed_tokens_per_s"] * m["step_s"] for m in timed)
    return {"real_tokens_per_s": real / seconds, "processed_tokens_per_s": processed / seconds,
            "real_fraction": real / processed, "real_tokens": round(real), "steps_timed": len(timed)}


def run_trainer_child(args: list[str], rss_out: Path) -> None:
    """scripts/train_dft.py in this process (so that its peak RSS is this process's).  The peak is
    written by an exit handler: a finished train_dft.py ends the process itself, after running
    them (nemo_dft/platform/exit.py), and one that fails raises SystemExit through here."""

    def record_peak_rss() -> None:
        rss_out.write_text(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))

    atexit.register(record_peak_rss)
    sys.argv = [str(REPO / "scripts" / "train_dft.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")



def paper_groups(data: Path, scale: float, steps: int) -> list[dict]:
    """The trainer's groups in the trainer's order: the same dataset class, tokenizer and seed."""
    from transformers import AutoTokenizer

    from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
    from nemo_dft.data.io import read_rows
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    max_length, max_prompt_length = lengths(scale)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    dataset = DFTGroupDataset(list(read_rows(data)), tokenizer,
                              GroupSettings(NUM_NEGATIVES, max_length, max_prompt_length, seed=SEED), str(data))
    return [dataset.group(i) for i in range(steps * PROMPTS_PER_STEP)], len(tokenizer)


def run_paper(data: Path, steps: int, scale: float, small: bool) -> dict:
    """The paper trainer's pattern in HF transformers: steps of 8 prompts, micro-batches of 4."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from nemo_dft.objective import dft_loss

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    groups, vocab = paper_groups(data, scale, steps)
    shape = SMALL_SHAPE if small else SHAPE
    config = MistralConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
                           num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
                           num_key_value_heads=shape["num_query_groups"], head_dim=shape["kv_channels"],
                           vocab_size=vocab, max_position_embeddings=4096, sliding_window=None,
                           attn_implementation="eager")
    policy = MistralForCausalLM(config)
    reference = MistralForCausalLM(config).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-5)
    u = torch.zeros(len(groups))
    times, real, positions = [], 0, 0
    for step in range(steps):
        started = time.perf_counter()
        step_groups = groups[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP]
        counts = [0, 0]
        for first in range(0, PROMPTS_PER_STEP, PAPER_MICRO):
            items = step_groups[first:first + PAPER_MICRO]
            index = torch.tensor([first + step * PROMPTS_PER_STEP + i for i in range(len(items))])
            pos, neg, pos_len, neg_len, ref_neg, micro_counts = micro_batch_scores(policy, reference, items)
            result = dft_loss(pos, neg, u[index], tau=1.0, gamma=0.85, ref_neg_logps=ref_neg, pos_lengths=pos_len,
                              neg_lengths=neg_len, with_metrics=False)
            u[index] = result.u
            (result.loss * len(items) / PROMPTS_PER_STEP).backward()
            counts = [a + b for a, b in zip(counts, micro_counts, strict=True)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - started)
            real += counts[0]
            positions += counts[1]
    seconds = sum(times)
    return {"real_tokens_per_s": real / seconds, "processed_tokens_per_s": positions / seconds,
            "real_fraction": real / positions, "real_tokens": real, "steps_timed": len(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def micro_batch_scores(policy, reference, items):
    """([B] pos, [B, m] neg) policy scores with grad, [B, m] reference scores, (real positions, policy
    positions): [positive; negatives] of each prompt padded to the micro-batch's longest, and the
    reference over every row, as the paper's trainer."""
    import torch

    from nemo_dft.data.collate import collate_groups
    from nemo_dft.modeling.logprobs import sequence_logps, split_groups

    group = 1 + NUM_NEGATIVES
    batch = collate_groups(items, pad_id=0, pad_multiple=1)
    lengths_list = batch["lengths"].tolist()
    width = batch["tokens"].shape[1]
    logps = token_logps(policy, batch["tokens"], batch["labels"], batch["position_ids"],
                        padded_mask(lengths_list, width))
    sums, seq_lengths = sequence_logps(logps, batch["loss_mask"])
    with torch.no_grad():
        ref = token_logps(reference, batch["tokens"], batch["labels"], batch["position_ids"],
                          padded_mask(lengths_list, width))
        ref_neg = split_groups(sequence_logps(ref, batch["loss_mask"])[0], group)[1].reshape(-1)
    pos, neg = split_groups(sums, group)
    pos_len, neg_len = split_groups(seq_lengths, group)
    return pos, neg, pos_len, neg_len, ref_neg.view(-1, NUM_NEGATIVES), (int(batch["lengths"].sum()),
                                                                        batch["tokens"].numel())


def padded_mask(lengths_list, width):
    """Additive causal mask of right-padded rows [R, 1, W, W]."""
    import torch

    causal = torch.ones(width, width, dtype=torch.bool).tril()
    real = torch.arange(width)[None, :] < torch.tensor(lengths_list)[:, None]
    allowed = causal[None] & real[:, None, :] & real[:, :, None]
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    blocked = ~allowed[:, None]
    return torch.zeros(len(lengths_list), 1, width, width).masked_fill(blocked, torch.finfo(torch.float32).min)


def token_logps(model, tokens, labels, position_ids, mask):
    import torch

    logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=mask).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def run_once(variant: str, data: Path, root: Path, steps: int, scale: float, small: bool, index: int,
             micro_batch: int = PAPER_MICRO) -> dict:
    """One run of ``variant`` in its own process; the load average before it is part of the result."""
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"  {variant:12} load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ...", end="", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    started = time.perf_counter()
    if variant == "paper":
        command = [sys.executable, __file__, "--paper-child", str(data), "--steps", str(steps), "--scale", str(scale),
                   *(["--small"] if small else [])]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"paper failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        run_dir = root / f"{variant}-{index}"
        rss = root / f"{variant}-{index}.rss.json"
        from benchmarks.dft_vs_sft import _free_port  # a port free on IPv4 and IPv6 alike

        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        command = [sys.executable, __file__, "--trainer-child", str(rss), "--",
                   *trainer_args(variant, data, run_dir, steps, scale, small, micro_batch)]
        log = root / f"{variant}-{index}.log"
        with log.open("w") as handle:
            done = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            sys.exit(f"{variant} failed ({log}):\n{log.read_text()[-3000:]}")
        result = {**trainer_result(run_dir), **json.loads(rss.read_text())}
    result.update(load=load, wall_s=round(time.perf_counter() - started, 1))
    print(f" {result['real_tokens_per_s']:.0f} real tok/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every variant (default 3)")
    parser.add_argument("--steps", type=int, default=8, help=f"steps per run; the first {WARMUP_STEPS} are not timed")
    parser.add_argument("--scale", type=float, default=0.125, help="factor on every length of the distribution")
    parser.add_argument("--micro-batch", type=int, default=PAPER_MICRO,
                        help=f"prompts per micro-batch of padded, packed and dft2_packed (default {PAPER_MICRO}, "
                             "the paper pattern's)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--work-dir", type=Path, help="run directories and logs (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="a 2-layer, hidden-64 model (smoke test)")
    parser.add_argument("--paper-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trainer-child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.trainer_child:
        run_trainer_child([a for a in rest if a != "--"], args.trainer_child)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.paper_child:
        print(json.dumps(run_paper(args.paper_child, args.steps, args.scale, args.small)))
        return
    if args.micro_batch < 1 or PROMPTS_PER_STEP % args.micro_batch:
        parser.error(f"--micro-batch must divide the {PROMPTS_PER_STEP} prompts of a step; got {args.micro_batch}")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS} (the first {WARMUP_STEPS} steps are not timed)")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="step_cost-") as scratch:
        root = args.work_dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        data = root / "data.jsonl"
        make_data(data, PROMPTS_PER_STEP * args.steps, args.scale)
        shape = SMALL_SHAPE if args.small else SHAPE
        print(f"model: Mistral-shaped {shape}, fp32, 1 thread; {PROMPTS_PER_STEP} prompts per step, m = "
              f"{NUM_NEGATIVES}, {args.steps} steps ({WARMUP_STEPS} untimed); micro-batches of "
              f"{args.micro_batch} prompts (paper: {PAPER_MICRO}); lengths: the issue-15 distribution "
              f"scaled by {args.scale} (data.max_length {lengths(args.scale)[0]}); packed_rows: pack_length "
              f"{pack_length(args.scale)}")
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            order = list(args.variants) if round_index % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                runs[variant].append(run_once(variant, data, root, args.steps, args.scale, args.small, round_index,
                                               args.micro_batch))
    report = {"micro_batch": args.micro_batch, "paper_micro_batch": PAPER_MICRO, **summarize(runs)}
    print(f"{'variant':12} {'real tok/s':>11} {'processed tok/s':>16} {'real fraction':>14} {'peak RSS MB':>12}")
    for name, v in report["variants"].items():
        print(f"{name:12} {v['real_tokens_per_s']:11.1f} {v['processed_tokens_per_s']:16.1f} "
              f"{v['real_fraction']:14.3f} {v['peak_rss_mb']:12.0f}")
    print("real tokens/s, ratio of medians (paired per round): " + "   ".join(
        f"{name.replace('_vs_', ' / ')} {value:.2f}x ({', '.join(f'{r:.2f}' for r in report['paired_ratios'][name])})"
        for name, value in report["ratios"].items()))
    if args.out:
        from nemo_dft.data.io import write_text_atomic

        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")


RATIOS = (("packed", "paper"), ("packed", "padded"), ("packed_rows", "padded"), ("packed_rows", "paper"),
          ("dft2_packed", "packed"))


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds per variant; ratios of the medians and per round."""
    variants = {}
    for name, results in runs.items():
        variants[name] = {key: statistics.median(r[key] for r in results)
                          for key in ("real_tokens_per_s", "processed_tokens_per_s", "real_fraction", "peak_rss_mb")}
        variants[name].update(real_tokens=results[0]["real_tokens"], rounds=results)
    ratios, paired = {}, {}
    for ours, base in RATIOS:
        if ours in runs and base in runs:
            name = f"{ours}_vs_{base}"
            ratios[name] = variants[ours]["real_tokens_per_s"] / variants[base]["real_tokens_per_s"]
            paired[name] = [a["real_tokens_per_s"] / b["real_tokens_per_s"]
                            for a, b in zip(runs[ours], runs[base], strict=True)]
    return {"variants": variants, "ratios": ratios, "paired_ratios": paired}


if __name__ == "__main__":
    main()
