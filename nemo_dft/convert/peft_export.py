"""A LoRA run's adapters as a Hugging Face PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``), for ``peft.PeftModel.from_pretrained`` on the exported base model.

NeMo adapts the fused layers, HF PEFT the separate projections.  A fused adapter ``B @ A`` splits
exactly: every projection keeps the shared A, and B is cut by rows in the order megatron stores
the fused weight -- ``linear_qkv`` per query group ``[q heads of the group, k, v]``, ``linear_fc1``
``[gate; up]`` -- the order the base-weight export splits by too.  The scale ``alpha / dim`` is
PEFT's ``lora_alpha / r``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from nemo_dft.convert.arch import check_nemo_dir
from nemo_dft.convert.errors import ConversionError
from nemo_dft.convert.progress import note

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# NeMo's adapted layer -> (HF block, HF projections in the order of its rows)
HF_PROJECTIONS = {
    "linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attn", ("o_proj",)),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", ("down_proj",)),
}


def split_lora_b(kind: str, b: torch.Tensor, config: Any) -> list[torch.Tensor]:
    """B of a fused layer cut into the HF projections' B matrices (rows), see the module docstring."""
    if kind == "linear_qkv":
        groups = config.num_query_groups or config.num_attention_heads
        per_group = config.num_attention_heads // groups
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        rows = b.reshape(groups, per_group + 2, head_dim, b.shape[-1])
        return [rows[:, :per_group].reshape(-1, b.shape[-1]), rows[:, per_group].reshape(-1, b.shape[-1]),
                rows[:, per_group + 1].reshape(-1, b.shape[-1])]
    if kind == "linear_fc1":  # Mistral/Llama: SwiGLU, gate rows then up rows
        return list(b.chunk(2, dim=0))
    return [b]


def hf_adapter_tensors(module: torch.nn.Module, config: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's tensors (``base_model.model.model.layers.N.<block>.<proj>.lora_A/B.weight``) of an
    unsharded model, and the HF projection names they adapt."""
    from nemo_dft.modeling.lora import named_wrappers

    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, wrapper in named_wrappers(module):
        number, path = name.split(".", 1)
        kind = path.rsplit(".", 1)[-1]
        block, projections = HF_PROJECTIONS[kind]
        a = wrapper.adapter.linear_in.weight.detach().float().cpu()
        b = wrapper.adapter.linear_out.weight.detach().float().cpu()
        for projection, b_part in zip(projections, split_lora_b(kind, b, config), strict=True):
            prefix = f"base_model.model.model.layers.{int(number) - 1}.{block}.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = a.clone().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b_part.clone().contiguous()
            targets.add(projection)
    return tensors, sorted(targets)


def export_adapter(
    nemo: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write the adapters of LoRA checkpoint ``nemo`` (any TP/PP) as an HF PEFT adapter in ``out``.

    ``base_model`` is recorded as ``base_model_name_or_path``: the HF export of the run's base
    (``scripts/convert_hf.py export`` of its ``model.init_from``)."""
    from nemo_dft.convert.api import _prepare_out
    from nemo_dft.convert.cpu import prepare_process

    nemo_dir = Path(nemo)
    check_nemo_dir(nemo_dir)
    out = Path(out)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    prepare_process()
    from nemo.lightning import teardown
    from peft import LoraConfig
    from safetensors.torch import save_file

    from nemo_dft.convert.load import load_nemo_model
    from nemo_dft.convert.mapping import unwrap_module
    from nemo_dft.modeling.lora import named_wrappers

    model, trainer = load_nemo_model(nemo_dir, on_gpu=False)
    try:
        module = unwrap_module(model)
        wrappers = named_wrappers(module)
        if not wrappers:
            raise ConversionError(f"{nemo_dir}: not a LoRA checkpoint (no adapters); export it without --adapter")
        if not model.config.gated_linear_unit:
            raise ConversionError(f"{nemo_dir}: HF Mistral/Llama adapters need a gated MLP (SwiGLU)")
        adapter = wrappers[0][1].adapter
        tensors, targets = hf_adapter_tensors(module, model.config)
        dropout = adapter.dropout.p if adapter.dropout is not None else 0.0
    finally:
        teardown(trainer, model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = LoraConfig(r=adapter.dim, lora_alpha=adapter.alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    out.mkdir(parents=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    note(f"adapter export finished in {time.perf_counter() - start:.1f} s: {out} "
         f"({len(wrappers)} NeMo adapters -> {len(tensors) // 2} PEFT adapters on {', '.join(targets)})")
    return out


def load_hf_with_adapter(hf_base: str | Path, adapter_dir: str | Path) -> Any:
    """The exported base model with the exported adapter applied by ``peft`` (fp32, eval)."""
    from peft import PeftModel

    from nemo_dft.convert.logits import load_hf_model

    return PeftModel.from_pretrained(load_hf_model(hf_base), str(adapter_dir)).eval()
