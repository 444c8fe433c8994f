"""Cost of one DFT optimizer step: nemo_dft's padded and packed layouts against the paper trainer's pattern.

    .venv/bin/python benchmarks/step_cost.py [--steps 4] [--scale 0.125] [--out FILE]

Four variants, each in its own process (peak RSS of that process), same model, weights and data,
all written with HF transformers (Mistral architecture, fp32, eager attention, 1 thread):

- ``padded``: nemo_dft's padded layout (``collate_groups``): micro-batches of 2 prompts (the
  cluster recipe's PP = 1 setting), rows padded to the longest (rounded up to 8); the frozen
  reference scores the negative rows only;
- ``packed``: nemo_dft's packed layout (``pack_groups``, ``data.packing=true``): the 2 prompts'
  sequences end to end in one row, a block-diagonal causal mask, positions restarting per
  sequence; the reference scores the negatives, re-packed;
- ``packed_rows``: the layout pipeline parallelism trains (``data.pack_length``, ``pack_step``): the
  step's groups planned into rows of exactly ``pack_length`` positions (4096 scaled by ``--scale``),
  one micro-batch per row; the reference scores each row's negatives re-packed, all of a step's
  reference rows padded to one width (the pipelined reference's shape);
- ``paper``: the paper trainer's pattern: micro-batches of 4 prompts, [positive; negatives]
  padded to the longest sequence of the micro-batch, a frozen reference forward over all rows.

Each step: 16 prompts, a data-parallel rank's share of the paper's 128-prompt step at DP = 8
(gradient accumulation over the micro-batches), policy forward and backward,
reference forward (no grad), the DFT loss (nemo_dft.objective), one Adam step.  Lengths: the
issue-15 UltraFeedback-like distribution (nemo_dft.data.lengths) scaled by ``--scale``.

Printed per variant: real tokens/s (the step's real policy tokens over its median wall time),
processed tokens/s (positions computed by the policy and the reference forwards), the real-token
fraction (real policy tokens / policy positions) and peak RSS; then the ratios of real tokens/s
packed/paper and packed/padded (and the same for packed_rows).  ``--out FILE`` writes them as JSON.
``--small`` swaps in a 2-layer, hidden-64 model (the smoke test's; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("padded", "packed", "packed_rows", "paper")
SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 4096}
SMALL_SHAPE = {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}
PROMPTS_PER_STEP, NUM_NEGATIVES = 16, 2
MICRO = {"padded": 2, "packed": 2, "paper": 4}  # packed_rows: as many prompts as fit a row
PACK_LENGTH = 4096  # data.pack_length at full scale


def make_groups(num_groups: int, scale: float, seed: int) -> list[dict]:
    import torch

    from nemo_dft.data.lengths import group_token_lengths
    from nemo_dft.data.tokenize import TokenizedPair

    generator = torch.Generator().manual_seed(seed)
    groups = []
    for index, (prompts, responses) in enumerate(group_token_lengths(num_groups, NUM_NEGATIVES, scale=scale,
                                                                     seed=seed)):
        prompt = torch.randint(1, SHAPE["vocab_size"], (max(prompts),), generator=generator).tolist()
        pairs = [TokenizedPair(prompt[-p:], torch.randint(1, SHAPE["vocab_size"], (r,), generator=generator).tolist())
                 for p, r in zip(prompts, responses, strict=True)]
        groups.append({"index": index, "epoch": 0, "pairs": pairs})
    return groups


def additive_mask(segment_ids):
    import torch

    from nemo_dft.modeling.packed_attention import block_causal_mask

    return torch.zeros(segment_ids.shape[0], 1, segment_ids.shape[1], segment_ids.shape[1]).masked_fill(
        block_causal_mask(segment_ids), torch.finfo(torch.float32).min)


def padded_mask(lengths, width):
    import torch

    segments = torch.full((len(lengths), width), -1)
    for r, n in enumerate(lengths):
        segments[r, :n] = 0
    return additive_mask(segments)


def token_logps(model, tokens, labels, position_ids, mask):
    import torch

    logits = model(input_ids=tokens, position_ids=position_ids, attention_mask=mask).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def micro_batch_scores(variant, policy, reference, items, reference_width=None):
    """([B] pos, [B, m] neg) policy scores with grad, [B, m] reference scores, (real, policy positions,
    reference positions).  ``items``: the micro-batch's groups, or (packed_rows) its packed row."""
    import torch

    from nemo_dft.data.collate import collate_groups
    from nemo_dft.data.packing import pack_groups, packed_negative_sub_batch, packed_sequence_logps
    from nemo_dft.modeling.logprobs import negative_sub_batch, sequence_logps, split_groups

    group = 1 + NUM_NEGATIVES
    if variant in ("packed", "packed_rows"):
        batch = pack_groups(items, pad_id=0) if variant == "packed" else items
        rows = batch["lengths"].numel()
        logps = token_logps(policy, batch["tokens"], batch["labels"], batch["position_ids"],
                            additive_mask(batch["segment_ids"]))
        sums, lengths = packed_sequence_logps(logps, batch["loss_mask"], batch["segment_ids"], rows)
        negatives = packed_negative_sub_batch(batch, group, width=reference_width)
        with torch.no_grad():
            ref = token_logps(reference, negatives["tokens"], negatives["labels"], negatives["position_ids"],
                              additive_mask(negatives["segment_ids"]))
        ref_neg, _ = packed_sequence_logps(ref, negatives["loss_mask"], negatives["segment_ids"],
                                           rows // group * NUM_NEGATIVES)
        ref_positions = negatives["tokens"].numel()
    else:
        batch = collate_groups(items, pad_id=0, pad_multiple=8 if variant == "padded" else 1)
        lengths_list = batch["lengths"].tolist()
        width = batch["tokens"].shape[1]
        logps = token_logps(policy, batch["tokens"], batch["labels"], batch["position_ids"],
                            padded_mask(lengths_list, width))
        sums, lengths = sequence_logps(logps, batch["loss_mask"])
        with torch.no_grad():
            if variant == "padded":  # nemo_dft: the reference scores the negatives only
                negatives = negative_sub_batch(batch, group)
                neg_lengths = [n for r, n in enumerate(lengths_list) if r % group]
                ref = token_logps(reference, negatives["tokens"], negatives["labels"], negatives["position_ids"],
                                  padded_mask(neg_lengths, width))
                ref_neg, _ = sequence_logps(ref, negatives["loss_mask"])
                ref_positions = negatives["tokens"].numel()
            else:  # the paper trainer: a reference forward over every row
                ref = token_logps(reference, batch["tokens"], batch["labels"], batch["position_ids"],
                                  padded_mask(lengths_list, width))
                ref_neg = split_groups(sequence_logps(ref, batch["loss_mask"])[0], group)[1].reshape(-1)
                ref_positions = batch["tokens"].numel()
    pos, neg = split_groups(sums, group)
    pos_len, neg_len = split_groups(lengths, group)
    counts = (int(batch["lengths"].sum()), batch["tokens"].numel(), ref_positions)
    return pos, neg, pos_len, neg_len, ref_neg.view(-1, NUM_NEGATIVES), counts


def pack_length(scale: float) -> int:
    return max(8, round(PACK_LENGTH * scale) // 8 * 8)


def micro_batches(variant: str, step_groups: list[dict], scale: float):
    """(groups or packed row, example indices, reference row width) of each micro-batch of a step."""
    import torch

    if variant != "packed_rows":
        micro = MICRO[variant]
        for first in range(0, len(step_groups), micro):
            items = step_groups[first:first + micro]
            yield items, torch.tensor([item["index"] for item in items]), None
        return
    from nemo_dft.data.packing import pack_step, step_negative_width

    rows = pack_step(step_groups, pad_id=0, pack_length=pack_length(scale))
    width = step_negative_width(rows, 1 + NUM_NEGATIVES)
    for row in rows:
        yield row, row["example_index"], width


def run_variant(variant: str, steps: int, scale: float, seed: int, small: bool) -> dict:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from nemo_dft.objective import dft_loss

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    config = MistralConfig(**(SMALL_SHAPE if small else SHAPE), max_position_embeddings=4096, sliding_window=None,
                           attn_implementation="eager")
    policy = MistralForCausalLM(config)
    reference = MistralForCausalLM(config).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-5)
    groups = make_groups(PROMPTS_PER_STEP * (steps + 1), scale, seed)
    u = torch.zeros(len(groups))
    times, real, policy_positions, processed = [], 0, 0, 0
    for step in range(steps + 1):  # step 0 warms up and is not timed
        started = time.perf_counter()
        step_counts = [0, 0, 0]
        step_groups = groups[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP]
        for items, index, reference_width in micro_batches(variant, step_groups, scale):
            pos, neg, pos_len, neg_len, ref_neg, counts = micro_batch_scores(variant, policy, reference, items,
                                                                             reference_width)
            result = dft_loss(pos, neg, u[index], tau=1.0, gamma=0.85, ref_neg_logps=ref_neg, pos_lengths=pos_len,
                              neg_lengths=neg_len, with_metrics=False)
            u[index] = result.u
            (result.loss * len(index) / PROMPTS_PER_STEP).backward()
            step_counts = [a + b for a, b in zip(step_counts, counts, strict=True)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - started)
            real += step_counts[0]
            policy_positions += step_counts[1]
            processed += step_counts[1] + step_counts[2]
    seconds = statistics.median(times) * len(times)
    return {"real_tokens_per_s": real / seconds, "processed_tokens_per_s": processed / seconds,
            "real_fraction": real / policy_positions, "real_tokens": real,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--scale", type=float, default=0.125, help="factor on every length of the distribution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--small", action="store_true", help="a 2-layer, hidden-64 model (smoke test)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.scale, args.seed, args.small)))
        return
    print(f"model: Mistral architecture, {SMALL_SHAPE if args.small else SHAPE}; fp32, 1 thread; "
          f"{PROMPTS_PER_STEP} prompts per step, m = {NUM_NEGATIVES}; lengths: the issue-15 distribution scaled by "
          f"{args.scale} (median prompt {120 * args.scale:g}, positive {250 * args.scale:g}, negative "
          f"{220 * args.scale:g} tokens); packed_rows: pack_length {pack_length(args.scale)}")
    variants = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--scale",
                   str(args.scale), "--seed", str(args.seed), *(["--small"] if args.small else [])]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
        variants[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    speed = {name: v["real_tokens_per_s"] for name, v in variants.items()}
    ratios = {f"{ours}_vs_{base}": speed[ours] / speed[base]
              for ours in ("packed", "packed_rows") for base in ("paper", "padded")}
    print(f"{'variant':11} {'real tok/s':>11} {'processed tok/s':>16} {'real fraction':>14} {'peak RSS MB':>12}")
    for name, v in variants.items():
        print(f"{name:11} {v['real_tokens_per_s']:11.1f} {v['processed_tokens_per_s']:16.1f} "
              f"{v['real_fraction']:14.3f} {v['peak_rss_mb']:12.0f}")
    print("real tokens/s: " + "   ".join(f"{name.replace('_vs_', ' / ')}: {value:.2f}x"
                                         for name, value in ratios.items()))
    if args.out:
        from nemo_dft.data.io import write_text_atomic

        write_text_atomic(args.out, json.dumps({"variants": variants, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
