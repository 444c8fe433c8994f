"""HF <-> NeMo 2 checkpoint conversion for Mistral and Llama models (``scripts/convert_hf.py``).

Names are loaded on first use, so importing the package (and ``--help``) stays instant; NeMo
itself is only imported when a conversion runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "import_hf": "api",
    "export_hf": "api",
    "verify": "api",
    "parse_dtype": "api",
    "register_hf_connectors": "connectors",
    "make_exporter": "connectors",
    "make_importer": "connectors",
    "load_nemo_model": "load",
    "apply_cpu_model_overrides": "cpu",
    "cpu_model_overrides": "cpu",
    "SUPPORTED_ARCHS": "arch",
    "detect_hf_arch": "arch",
    "detect_nemo_arch": "arch",
    "ConversionError": "errors",
    "ConfigMismatchError": "errors",
    "MissingFileError": "errors",
    "UnsupportedArchitectureError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
