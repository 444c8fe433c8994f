"""Worker for test_packed_attention: a megatron-core GPT model on the local layer spec (CPU) scores
sequences one by one (padded path, megatron's own attention) and packed into one row with tail
padding (THD, the trainer's path: VarlenCoreAttention); log-probs and gradients are saved.

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


def compare(model, sequences, pad=5):
    from nemo_dft.modeling.packed_attention import packed_forward_kwargs, prepare_packed

    prepare_packed(model)  # wraps the core attentions; unpacked calls pass through them unchanged
    separate_logps, separate_grads = [], 0
    for seq in sequences:
        tokens, labels = seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        logps, grads = logps_and_grads(model, tokens, labels, positions, None)
        separate_logps.append(logps[0])
        separate_grads = separate_grads + grads
    real = sum(len(s) - 1 for s in sequences)
    tokens = torch.cat([*(s[:-1] for s in sequences), torch.zeros(pad, dtype=torch.long)]).unsqueeze(0)
    labels = torch.cat([*(s[1:] for s in sequences), torch.zeros(pad, dtype=torch.long)]).unsqueeze(0)
    positions = torch.cat([*(torch.arange(len(s) - 1) for s in sequences), torch.zeros(pad, dtype=torch.long)])
    lengths = torch.tensor([len(s) - 1 for s in sequences])
    batch = {"tokens": tokens, "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}
    params = packed_forward_kwargs(batch, transformer_engine=False)["packed_seq_params"]
    model.zero_grad()
    logits = model(tokens, positions.unsqueeze(0), None, packed_seq_params=params)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[0, :real]
    logps.sum().backward()
    packed_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return {"separate": torch.cat(separate_logps), "packed": logps.detach(),
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
    results = {
        "no_window": compare(build(None), sequences),
        # shorter than most sequences: megatron's padded path and the packed one apply it per sequence
        "window": compare(build((5, 0)), sequences),
    }
    torch.save(results, sys.argv[1])
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
