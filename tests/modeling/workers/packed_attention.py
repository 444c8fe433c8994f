"""Worker for test_packed_attention: a megatron-core GPT model on the local layer spec (CPU) scores
sequences one by one and packed into one row; logits and gradients are saved for comparison.

Usage: python packed_attention.py OUTPUT.pt SEED  (MASTER_ADDR/MASTER_PORT set)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def build(window):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, params_dtype=torch.float32, use_cpu_initialization=True, window_size=window,
        hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # local, as on every CPU run: "auto" asserts on NVTE_* variables an earlier in-process run may have set
        attention_backend=AttnBackend.local,
    )
    torch.manual_seed(0)
    return GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=97,
                    max_sequence_length=256, position_embedding_type="rope")


def logps_and_grads(model, tokens, labels, position_ids, mask):
    model.zero_grad()
    logits = model(tokens, position_ids, mask)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps.sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return logps.detach(), grads


def compare(model, sequences, window_in_mask, clear_module_window=False):
    from nemo_dft.modeling.packed_attention import block_causal_mask

    if clear_module_window:
        for module in model.modules():
            if hasattr(module, "scale_mask_softmax"):
                module.scale_mask_softmax.window_size = None
    separate_logps, separate_grads = [], 0
    for seq in sequences:
        tokens, labels = seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        mask = block_causal_mask(torch.zeros_like(tokens), window_in_mask) if clear_module_window else None
        logps, grads = logps_and_grads(model, tokens, labels, positions, mask)
        separate_logps.append(logps[0])
        separate_grads = separate_grads + grads
    tokens = torch.cat([s[:-1] for s in sequences]).unsqueeze(0)
    labels = torch.cat([s[1:] for s in sequences]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s) - 1) for s in sequences]).unsqueeze(0)
    segments = torch.cat([torch.full((len(s) - 1,), r) for r, s in enumerate(sequences)]).unsqueeze(0)
    packed_logps, packed_grads = logps_and_grads(model, tokens, labels, positions,
                                                 block_causal_mask(segments, window_in_mask))
    return {"separate": torch.cat(separate_logps), "packed": packed_logps[0],
            "separate_grads": separate_grads, "packed_grads": packed_grads}


def main() -> None:
    os.environ.setdefault("RANK", "0")  # one process: started without torchrun
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_dft.platform.cpu_shim import enable_cpu_compat

    enable_cpu_compat()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    generator = torch.Generator().manual_seed(int(sys.argv[2]))
    sequences = [torch.randint(0, 97, (int(n),), generator=generator)
                 for n in torch.randint(4, 24, (5,), generator=generator)]
    window = (5, 0)
    results = {
        "no_window": compare(build(None), sequences, None),
        # the finding: with window_size set, the local softmax swaps the packed mask out
        "window_swapped": compare(build(window), sequences, window),
        # the window built into the block-diagonal mask (and taken away from the softmax)
        "window_in_mask": compare(build(window), sequences, window, clear_module_window=True),
    }
    torch.save(results, sys.argv[1])
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
