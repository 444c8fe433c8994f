"""Forward + backward of a megatron GPT model on the local layer spec over one step's groups, in
each micro-batch layout, the variants interleaved within every round so that a busy machine's
load falls on all of them alike (issue 26).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packed_attention.py [--scale 0.125] [--rounds 7]

Variants, on the same groups (lengths: nemo_dft.data.lengths scaled by ``--scale``, m = 2):

- ``padded``: micro-batches of 2 prompts, rows padded to the longest (megatron's causal mask);
- ``packed_mask``: the same 2 prompts end to end in one row, the dense block-diagonal mask
  (``block_causal_mask``, what the local spec ran before issue 26);
- ``packed_thd``: the same rows in THD format through ``VarlenCoreAttention`` (the trainer's path);
- ``rows_mask`` / ``rows_thd``: rows of ``data.pack_length`` positions (the PP layout), both ways.

Prints real tokens/s per variant (median over rounds) and the paired per-round speed ratios.
Only the policy's forward and backward are timed: no reference, loss, optimizer or data
loading, so the ratios isolate the layouts' model cost.  Mistral-shaped: hidden 512, 4 layers,
8 heads (4 KV groups) of 64, FFN 1536, vocabulary 512, fp32, 1 thread.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

VOCAB = 512


def build_model():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    from nemo_dft.platform.cpu_shim import enable_cpu_compat

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
    dist.init_process_group("gloo")
    enable_cpu_compat()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4, kv_channels=64,
        ffn_hidden_size=1536, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, params_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        attention_backend=AttnBackend.local)
    return GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=4096, position_embedding_type="rope")


def _up8(n: int) -> int:
    return -(-n // 8) * 8


def padded(lengths: list[int], generator: torch.Generator) -> dict:
    width = _up8(max(lengths))
    return {"tokens": torch.randint(0, VOCAB, (len(lengths), width), generator=generator),
            "position_ids": torch.arange(width).expand(len(lengths), width)}


def packed(lengths: list[int], generator: torch.Generator, width: int | None = None) -> dict:
    width = width or _up8(sum(lengths))
    segments = torch.full((1, width), -1)
    positions = torch.zeros(1, width, dtype=torch.long)
    start = 0
    for r, n in enumerate(lengths):
        segments[0, start:start + n] = r
        positions[0, start:start + n] = torch.arange(n)
        start += n
    return {"tokens": torch.randint(0, VOCAB, (1, width), generator=generator), "position_ids": positions,
            "segment_ids": segments, "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])}


def forward_backward(model, batch: dict, how: str) -> float:
    from nemo_dft.modeling.packed_attention import block_causal_mask, packed_forward_kwargs

    started = time.perf_counter()
    if how == "mask":
        logits = model(batch["tokens"], batch["position_ids"], block_causal_mask(batch["segment_ids"]))
    elif how == "thd":
        params = packed_forward_kwargs(batch, transformer_engine=False)["packed_seq_params"]
        logits = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
    else:
        logits = model(batch["tokens"], batch["position_ids"], None)
    logits.float().logsumexp(-1).sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.125, help="factor on every length of the distribution")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the timed step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from nemo_dft.data.lengths import group_input_lengths
    from nemo_dft.data.packing import plan_rows
    from nemo_dft.modeling.packed_attention import prepare_packed

    model = build_model()
    prepare_packed(model)  # the trainer's wrapping; padded and dense-mask calls pass through unchanged
    groups = group_input_lengths(args.prompts, scale=args.scale, seed=0)
    pack_length = _up8(3 * (max(2, round(1024 * args.scale)) - 1))  # the smallest data.pack_length allowed
    generator = torch.Generator().manual_seed(0)
    micro = [[n for g in groups[i:i + 2] for n in g] for i in range(0, len(groups), 2)]
    rows = [[n for g in row for n in groups[g]] for row in plan_rows([sum(g) for g in groups], pack_length)]
    variants = {
        "padded": ([padded(lengths, generator) for lengths in micro], "plain"),
        "packed_mask": ([packed(lengths, generator) for lengths in micro], "mask"),
        "packed_thd": ([packed(lengths, generator) for lengths in micro], "thd"),
        "rows_mask": ([packed(lengths, generator, pack_length) for lengths in rows], "mask"),
        "rows_thd": ([packed(lengths, generator, pack_length) for lengths in rows], "thd"),
    }
    for batches, how in variants.values():  # warm-up
        for batch in batches:
            forward_backward(model, batch, how)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants)
        random.Random(round_index).shuffle(order)
        for name in order:
            batches, how = variants[name]
            times[name].append(sum(forward_backward(model, batch, how) for batch in batches))
    real = sum(map(sum, groups))
    print(f"scale {args.scale}: {args.prompts} prompts, {real} real positions, micro-batches of 2 prompts, "
          f"rows of {pack_length}; load average at the end {os.getloadavg()}")
    for name, seconds in times.items():
        print(f"  {name:12s} real tokens/s {real / statistics.median(seconds):7.1f}")
    for fast, slow in (("packed_thd", "packed_mask"), ("rows_thd", "rows_mask"), ("packed_mask", "padded"),
                       ("packed_thd", "padded"), ("rows_mask", "padded"), ("rows_thd", "padded")):
        ratios = [s / f for f, s in zip(times[fast], times[slow], strict=True)]
        print(f"  {fast} / {slow}: {statistics.median(ratios):.2f}x (paired rounds {min(ratios):.2f} to "
              f"{max(ratios):.2f})")


if __name__ == "__main__":
    main()
