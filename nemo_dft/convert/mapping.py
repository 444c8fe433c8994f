"""Adapts NeMo's own HF weight maps to the NeMo model that is actually built.

NeMo's HF connectors name the pre-attention and pre-MLP norms as Transformer Engine fuses them
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``).  Without TE, megatron-core's
local layer spec keeps them as ``input_layernorm`` / ``pre_mlp_layernorm``; NeMo's conversion then
leaves the norms at their init values on import (silently) and crashes on export.  Every connector
funnels its map through ``nemo.lightning.io.apply_transforms``, so that is where the names are
rewritten, for whichever spec the NeMo model uses, without copying any weight map.  The same
funnel also drops the output-layer entry of models with tied embeddings and checks that every
weight on both sides is covered by the map, so a dropped tensor is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal

TE_FUSED_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# Names of the untied output projection on the NeMo and the HF side.
OUTPUT_LAYER_KEYS = ("output_layer.weight", "lm_head.weight")

KeySpec = str | tuple[str, ...] | dict[str, str]


def unwrap_module(module: Any) -> Any:
    """The megatron module inside NeMo's Lightning wrapper, as ``apply_transforms`` sees it."""
    megatron = sys.modules.get("megatron.core.transformer.module")  # not loaded: nothing to unwrap
    inner = getattr(module, "module", None)
    return inner if megatron is not None and isinstance(inner, megatron.MegatronModule) else module


def weight_names(module: Any) -> list[str]:
    """Parameter names of a module (tied parameters once), without TE's ``_extra_state``."""
    module = unwrap_module(module)
    names = [name for name, _ in module.named_parameters()] if hasattr(module, "named_parameters") else []
    if not names:  # NeMo's _ModelState holds a bare state dict
        names = list(module.state_dict())
    return [name for name in names if not name.endswith("_extra_state")]


def uses_local_norm_names(nemo_names: Iterable[str]) -> bool:
    """Whether a NeMo model was built with the local (non-TE) layer spec's norm names."""
    names = list(nemo_names)
    local = any(name.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for name in names)
    fused = any(name.endswith(tuple(TE_FUSED_TO_LOCAL)) for name in names)
    return local and not fused


def _rename(key: str) -> str:
    for fused, local in TE_FUSED_TO_LOCAL.items():
        key = key.replace(fused, local)
    return key


def _rename_spec(spec: KeySpec) -> KeySpec:
    if isinstance(spec, str):
        return _rename(spec)
    if isinstance(spec, tuple):
        return tuple(_rename(key) for key in spec)
    return {name: _rename(key) for name, key in spec.items()}


def _keys_of(spec: KeySpec) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, dict):
        return list(spec.values())
    return list(spec)


def _is_output_layer(spec: KeySpec) -> bool:
    return any(key in OUTPUT_LAYER_KEYS for key in _keys_of(spec))


def adapt_mapping(
    mapping: dict[str, str], transforms: list[Any], local_names: bool, tied: bool
) -> tuple[dict[str, str], list[Any]]:
    """A renamed copy of a connector's mapping and transforms; NeMo's objects are left as they are."""
    new_mapping: dict[str, str] = {}
    for source, target in mapping.items():
        if tied and (_is_output_layer(source) or _is_output_layer(target)):
            continue
        new_mapping[_rename(source) if local_names else source] = _rename(target) if local_names else target
    new_transforms = []
    for transform in transforms:
        if tied and (_is_output_layer(transform.source_key) or _is_output_layer(transform.target_key)):
            continue
        if local_names:
            transform = type(transform)(  # a StateDictTransform
                _rename_spec(transform.source_key), _rename_spec(transform.target_key), transform.transform
            )
        new_transforms.append(transform)
    return new_mapping, new_transforms


def _pattern(key: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", key)
    regex = "".join({"**": "(.+)", "*": "([^.]+)"}.get(part, re.escape(part)) for part in parts)
    return re.compile(f"^{regex}$")


def uncovered(names: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The names that no (wildcard) key of the map matches."""
    patterns = [_pattern(key) for key in keys]
    return [name for name in names if not any(p.match(name) for p in patterns)]


def check_coverage(
    source: Any, target: Any, mapping: dict[str, str], transforms: list[Any], where: str, tied: bool = False
) -> None:
    """Every source weight must be read and every target weight written by the map.

    With tied embeddings the output layer is the embedding: it is exempt on both sides (an HF
    model built under ``no_init_weights`` is not tied yet, so it still lists ``lm_head``).
    """
    from nemo_dft.convert.errors import ConfigMismatchError

    source_keys = list(mapping) + [k for t in transforms for k in _keys_of(t.source_key)]
    target_keys = list(mapping.values()) + [k for t in transforms for k in _keys_of(t.target_key)]
    for side, module, keys in (("source", source, source_keys), ("target", target, target_keys)):
        names = [n for n in weight_names(module) if not (tied and n in OUTPUT_LAYER_KEYS)]
        missing = uncovered(names, keys)
        if missing:
            verb = "read" if side == "source" else "written"
            raise ConfigMismatchError(
                f"{where}: {side} weights {missing[:6]}{' ...' if len(missing) > 6 else ''} would not be "
                f"{verb} by NeMo's weight map; the checkpoint has a layout this connector does not convert"
            )


@contextlib.contextmanager
def adapted_apply_transforms(
    nemo_side: Literal["source", "target"], tied: bool, where: str
) -> Iterator[None]:
    """Within this block, NeMo's ``io.apply_transforms`` renames, drops and checks as above."""
    import nemo.lightning.io as nemo_io

    original = nemo_io.apply_transforms

    def apply_transforms(source: Any, target: Any, mapping: dict[str, str], transforms=(), **kwargs: Any):
        nemo_module = source if nemo_side == "source" else target
        local = uses_local_norm_names(weight_names(nemo_module))
        mapping, transforms = adapt_mapping(mapping, list(transforms or []), local, tied)
        check_coverage(source, target, mapping, transforms, where, tied)
        return original(source, target, mapping=mapping, transforms=transforms, **kwargs)

    nemo_io.apply_transforms = apply_transforms
    try:
        yield
    finally:
        nemo_io.apply_transforms = original
