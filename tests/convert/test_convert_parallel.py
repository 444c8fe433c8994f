"""Export of checkpoints saved by two model-parallel ranks (the layouts of TP=2 and PP=2 runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_dft.convert import api
from tests.conftest import torchrun

pytestmark = pytest.mark.slow


# Qwen2 at TP=2 splits its q/k/v biases over the ranks, Qwen3 its heads (and with them the per-head
# q/k norms stay whole on each rank).  The Qwen2 case is in the extended tier (`make test-all`): its
# biases split along the same column-parallel dimension as the q/k/v weights that the Mistral and
# Qwen3 cases check, and its TP=1 round trip (test_convert_roundtrip.py) checks the biases themselves.
PARALLEL_CASES = [
    pytest.param(("mistral", 2, 1), id="tp2"),
    pytest.param(("mistral", 1, 2), id="pp2"),
    pytest.param(("qwen2", 2, 1), id="qwen2-tp2", marks=pytest.mark.extended),
    pytest.param(("qwen3", 2, 1), id="qwen3-tp2"),
]


@pytest.fixture(scope="module", params=PARALLEL_CASES)
def parallel_checkpoint(request, tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(HF source, the same model imported and re-saved by 2 ranks, the parallel setting used)."""
    arch, tp, pp = request.param
    source = tiny_hf(arch, False)
    root = tmp_path_factory.mktemp(f"{arch}-tp{tp}pp{pp}")
    nemo_tp1 = api.import_hf(source, root / "tp1")
    args = [str(nemo_tp1), str(root / "out"), "--tp", str(tp), "--pp", str(pp)]
    torchrun(Path(__file__).with_name("reshard.py"), args, nproc=2)
    setting = "tensor_model_parallel_size" if tp == 2 else "pipeline_model_parallel_size"
    return source, root / "out", setting


def test_checkpoint_really_has_two_shards(parallel_checkpoint: tuple[Path, Path, str]) -> None:
    _, nemo, setting = parallel_checkpoint
    shards = sorted(path.name for path in (nemo / "weights").glob("__*_*.distcp"))
    assert {name.split("_")[2] for name in shards} == {"0", "1"}, shards  # files written by ranks 0 and 1
    saved = _leaf_values(json.loads((nemo / "context" / "io.json").read_text()))
    assert saved[f"<root>.model.config.{setting}"] == 2


def test_export_is_bit_identical_and_logits_match(
    parallel_checkpoint: tuple[Path, Path, str], tmp_path: Path
) -> None:
    source, nemo, _ = parallel_checkpoint
    out = api.export_hf(nemo, tmp_path / "hf")
    original = load_file(str(source / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    assert api.verify(out, nemo).max_abs_diff < 1e-5


def _leaf_values(node: object) -> dict[str, object]:
    """Path -> value of every leaf in NeMo's (fiddle) io.json."""
    found: dict[str, object] = {}
    if isinstance(node, dict):
        if node.get("type") == "leaf":
            found.update({path: node.get("value") for path in node.get("paths", [])})
        for child in node.values():
            found.update(_leaf_values(child))
    elif isinstance(node, list):
        for child in node:
            found.update(_leaf_values(child))
    return found
