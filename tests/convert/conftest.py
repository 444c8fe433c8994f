"""Fixtures shared by the conversion tests: tiny random HF checkpoints of each variant."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from nemo_dft.demo.tiny_model import build_tiny_hf_model, tiny_hf_model_dir

# Llama 3.1's rope scaling, with an original context (32) shorter than the test inputs (64) and
# low/high frequency factors that are not NeMo's defaults, so that a dropped factor shows in logits.
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 2.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 32,
}


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_hf(arch, tied, window=None)``: a tiny HF checkpoint (untied: the shared cached one).

    ``arch`` is mistral, llama, qwen2, qwen3 or llama31 (a Llama with Llama 3.1 rope scaling).
    ``window`` gives a Mistral a sliding window of that many tokens (same weights as untied).
    """
    cache: dict[tuple[str, bool, int | None], Path] = {}

    def get(arch: str, tied: bool, window: int | None = None) -> Path:
        key = (arch, tied, window)
        if key not in cache:
            if arch == "llama31":
                out = tmp_path_factory.mktemp(f"hf-llama31-{'tied' if tied else 'untied'}")
                build_tiny_hf_model(out, "llama", seed=2, tie_embeddings=tied,
                                    extra_config={"rope_scaling": dict(LLAMA31_ROPE_SCALING)})
            elif window is not None:
                out = tmp_path_factory.mktemp(f"hf-{arch}-window{window}") / "hf"
                shutil.copytree(get(arch, tied), out)
                config = json.loads((out / "config.json").read_text())
                config["sliding_window"] = window
                (out / "config.json").write_text(json.dumps(config, indent=2))
            elif tied:
                out = tmp_path_factory.mktemp(f"hf-{arch}-tied")
                build_tiny_hf_model(out, arch, seed=1, tie_embeddings=True)
            else:
                out = tiny_hf_model_dir(arch)
            cache[key] = out
        return cache[key]

    return get
