"""Negative generation for DFT: K samples per prompt from the base model, in the 1-to-m layout.

Runs in its own environment (``.venv-gen``, vLLM with transformers 5) as well as in the training
one, so nothing here imports NeMo or Megatron; torch, transformers models and vLLM are imported
only when a backend is built.  See docs/generation.md.
"""

from __future__ import annotations

from nemo_dft.generation.config import ConfigError, load_config
from nemo_dft.generation.merge import MergeError, merge_shards
from nemo_dft.generation.runner import GenerationError, run_generation

__all__ = ["ConfigError", "GenerationError", "MergeError", "load_config", "merge_shards", "run_generation"]
