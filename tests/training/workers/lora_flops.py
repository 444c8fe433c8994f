"""Worker for test_throughput: torch's FLOP counter over one forward and backward pass of the tiny
megatron-core GPT model (local layer spec, CPU), fully trainable and with NeMo's LoRA adapters on
the frozen model as training applies them (nemo_dft.modeling.lora.apply_lora).

Usage: python lora_flops.py OUTPUT.pt ROWS WIDTH RANK TARGET[,TARGET...] ...  (MASTER_ADDR/MASTER_PORT set)
One LoRA count per comma-separated target list.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def build():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    config = TransformerConfig(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=32,
        ffn_hidden_size=384, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, params_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        attention_backend=AttnBackend.local,
    )
    torch.manual_seed(0)
    return GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=512,
                    max_sequence_length=256, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def count(model, rows: int, width: int) -> int:
    """FLOPs of one forward and backward pass (every aten op torch's counter knows: matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = torch.randint(0, 512, (rows, width))
    positions = torch.arange(width).expand(rows, width)
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens, positions, None)
        logits.float().logsumexp(-1).sum().backward()
    return counter.get_total_flops()


def main() -> None:
    os.environ.setdefault("RANK", "0")  # one process: started without torchrun
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_dft.modeling.lora import LoRASettings, apply_lora
    from nemo_dft.platform.cpu_shim import enable_cpu_compat

    enable_cpu_compat()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    output, rows, width, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    results = {"full": count(build(), rows, width)}
    for targets in sys.argv[5:]:
        model = build()
        wrapped = apply_lora(model, LoRASettings(dim=rank, alpha=2.0 * rank, target_modules=tuple(targets.split(","))))
        results[targets] = {"flops": count(model, rows, width), "wrapped": wrapped}
    torch.save(results, output)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
