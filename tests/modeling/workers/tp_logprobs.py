"""Worker for test_logprobs: sequence log-probs at TP=2, then TP=1, in the same 2 processes.

Usage: torchrun --nproc-per-node 2 tp_logprobs.py INPUTS.pt OUTPUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_dft.modeling.logprobs import sequence_logps, token_logps


def run(inputs: dict, tp: int) -> dict[str, torch.Tensor]:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    vocab = inputs["logits"].shape[-1]
    shard = vocab // tp
    logits = inputs["logits"][..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    original = logits.detach().clone()
    token_logp = token_logps(logits, inputs["labels"])  # inplace=False must leave logits untouched
    assert torch.equal(logits.detach(), original), "token_logps modified its fp32 input"
    sums, lengths = sequence_logps(token_logp, inputs["mask"])
    (sums * inputs["upstream"]).sum().backward()
    grads = [torch.empty_like(logits.grad) for _ in range(tp)]
    dist.all_gather(grads, logits.grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    parallel_state.destroy_model_parallel()
    return {"sums": sums.detach(), "lengths": lengths, "grad": torch.cat(grads, dim=-1)}


def main() -> None:
    dist.init_process_group("gloo")
    inputs = torch.load(sys.argv[1], weights_only=True)
    results = {"tp2": run(inputs, tp=2), "tp1": run(inputs, tp=1)}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
