"""Random-number-generator state in the distributed checkpoint, so dropout resumes exactly.

Every rank has its own generators (megatron seeds tensor- and pipeline-parallel ranks apart), so
the state is a ``ShardedObject`` with one shard per (pipeline, tensor, data) rank, saved and
loaded by ``dist_checkpointing`` with the model.  A resume on a different layout cannot map old
generators onto new ranks; it keeps the freshly seeded ones and says so.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

RNG_KEY = "dft_rng_state"
LAYOUT_KEY = "dft_rng_layout"  # (PP, TP, DP) of the run that saved the state, in the common state


def _ranks_and_layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    from megatron.core import parallel_state as ps

    ranks = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(with_context_parallel=True),
    )
    layout = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(with_context_parallel=True),
    )
    return ranks, layout


def current_layout() -> tuple[int, int, int]:
    return _ranks_and_layout()[1]


def capture() -> dict[str, Any]:
    """This rank's generators as tensors and plain values (safe for ``weights_only`` loading)."""
    from megatron.core import tensor_parallel

    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    captured: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "tracker": {k: v.cpu() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        captured["cuda"] = torch.cuda.get_rng_state()
    return captured


def restore(captured: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    version, state, gauss = captured["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = captured["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(captured["torch"])
    if "cuda" in captured and torch.cuda.is_available():
        torch.cuda.set_rng_state(captured["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(captured["tracker"])


def sharded_rng_state(data: dict[str, Any] | None = None):
    """The ``ShardedObject`` of this rank's state (``data=None`` gives the template for loading)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ranks, layout = _ranks_and_layout()
    return ShardedObject(RNG_KEY, data, global_shape=layout, global_offset=ranks, replica_id=0)
