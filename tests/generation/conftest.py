"""Fixtures for the generation tests: the tiny model and its tokenizer, small HF-backend configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from generation_testutils import messages_input
from omegaconf import DictConfig

from nemo_dft.generation.config import load_config


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two OpenMP threads spinning on a busy 2-core machine make HF generate 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from nemo_dft.demo.tiny_model import tiny_hf_model_dir

    return tiny_hf_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_model: Path) -> Callable[..., DictConfig]:
    """A small HF-backend config over 7 tiny-task prompts; keyword overrides use dotted keys."""
    data = messages_input(tmp_path / "input.jsonl", 7)

    def make(out: str = "out", **overrides: Any) -> DictConfig:
        base = {
            "backend": "hf",
            "model.path": str(tiny_model),
            "data.input": str(data),
            "data.format.id_field": "id",
            "output.dir": str(tmp_path / out),
            "sampling.n": 3,
            "sampling.max_new_tokens": 12,
            "shard.index": None,
            "hf.num_threads": 1,
        }
        base.update(overrides)
        dotlist = [f"{k}={'null' if v is None else v}" for k, v in base.items()]
        return load_config(None, dotlist)

    return make
