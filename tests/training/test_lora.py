"""LoRA-DFT: the reference is the base checkpoint, scored by the policy with its adapters off.

One base checkpoint, then 3 steps of reference-based DFT from it with LoRA (adapter-free
reference) and with full fine-tuning (the frozen copy).  Both see the same batches, so every
reference log-prob of the LoRA run must equal the frozen copy's bit for bit (fp32) at step 0 and
after the adapters have moved; only the adapters and their Adam state train.  A killed LoRA run
resumes bit-exactly.  The LoRA run saves adapter-only checkpoints (``peft.checkpoint=adapters``, the
default) every step, beside the same run with ``peft.checkpoint=full``: the former hold the adapters
only, record their base, and a changed or missing base is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_child, script_command

pytestmark = pytest.mark.slow

COMMON = ["trainer.progress_bar=false", "data.num_epochs=1", "data.eval_path=null", "model.global_batch_size=8",
          "optim.warmup_ratio=0", "dft.reference=frozen", "log.tensorboard=false"]
LORA = ["peft.scheme=lora", "peft.dim=4", "peft.alpha=8", "optim.lr=3e-2", "optim.min_lr=3e-2"]


def launch(run_dir: Path, *overrides: str) -> None:
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON, *overrides))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def recorded_run(run_dir: Path, *overrides: str) -> list[dict]:
    output = run_dir.with_suffix(".pt")
    command = [sys.executable, "tests/training/workers/record_reference.py", str(output), f"run.dir={run_dir}",
               *COMMON, *overrides]
    result = run_child(command)
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return torch.load(output, weights_only=False)


def last_checkpoint(run_dir: Path) -> Path:
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last


def full_state(weights: Path, out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(weights), str(out))
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, initial_checkpoint):
    root = tmp_path_factory.mktemp("lora")
    base = initial_checkpoint  # the untrained model (lr = 0), shared with other files (tests/conftest.py)
    steps = ["trainer.max_steps=3", f"model.init_from={base}"]
    every_step = "checkpoint.every_n_steps=1"
    return {
        "root": root,
        "base": base,
        "lora": recorded_run(root / "lora", *steps, *LORA, every_step),
        "lora_full": recorded_run(root / "lora_full", *steps, *LORA, every_step, "peft.checkpoint=full"),
        "full": recorded_run(root / "full", *steps),
    }


def tensor_keys(checkpoint: Path) -> list[str]:
    """The tensor keys of a checkpoint's weights part, from its dist_checkpointing metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint / "weights")).read_metadata()
    return sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata))


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_reference_is_the_base_checkpoint_exactly(runs):
    lora, full = runs["lora"], runs["full"]
    assert [r["step"] for r in lora] == [r["step"] for r in full] and {r["step"] for r in lora} == {0, 1, 2}
    for ours, copy in zip(lora, full, strict=True):
        assert torch.equal(ours["index"], copy["index"])
        assert ours["logps"].dtype == torch.float32
        assert torch.equal(ours["logps"], copy["logps"]), f"step {ours['step']}: reference log-probs differ"


def test_adapter_checkpoints_hold_only_the_adapters_and_their_base_record(runs):
    """Every checkpoint of the LoRA run (one per step): the adapters' A and B and their Adam moments,
    no base weight; common.pt names the base and its fingerprint.  The same run with
    peft.checkpoint=full holds the base weights too, and no record."""
    from nemo_dft.modeling.adapter_checkpoint import BASE_KEY, base_fingerprint

    root = runs["root"]
    saved = sorted(p for p in (root / "lora" / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in saved] == ["step=2", "step=3", "step=3-last"]
    for checkpoint in saved:
        keys = tensor_keys(checkpoint)
        print(checkpoint.name, keys)
        model = [k for k in keys if k.startswith("module.")]
        assert len(model) == 4 * 2 and all(".adapter.linear_" in k for k in model), model
        moments = [k for k in keys if k.startswith("optimizer.state.")]
        assert len(moments) == 2 * len(model) and all(".adapter." in k for k in moments), moments
        assert set(keys) == set(model) | set(moments), set(keys) - set(model) - set(moments)
        common = torch.load(checkpoint / "weights" / "common.pt", weights_only=False)
        assert common[BASE_KEY] == {"init_from": str(runs["base"].absolute()),
                                    "fingerprint": base_fingerprint(runs["base"])}
        assert "dft_u_table" in common and common["global_step"] == int(checkpoint.name.split("=")[1][:1])
    full = last_checkpoint(root / "lora_full")
    full_keys = tensor_keys(full)
    assert "module.decoder.layers.self_attention.linear_qkv.weight" in full_keys
    assert "module.embedding.word_embeddings.weight" in full_keys
    assert BASE_KEY not in torch.load(full / "weights" / "common.pt", weights_only=False)
    assert set(tensor_keys(last_checkpoint(root / "lora"))) < set(full_keys)
    sizes = {name: du_bytes(last_checkpoint(root / name) / "weights") for name in ("lora", "lora_full")}
    print("weights/ on disk:", sizes)
    assert sizes["lora"] < sizes["lora_full"] / 3


def test_only_the_adapters_train(runs):
    """Adapter-only and full checkpoints of the same run hold the same adapters and Adam state; the
    full one's base weights are the base checkpoint's."""
    root = runs["root"]
    base = full_state(runs["base"] / "weights", root / "base_state.pt")
    trained = full_state(last_checkpoint(root / "lora_full") / "weights", root / "lora_full_state.pt")
    adapters_only = full_state(last_checkpoint(root / "lora") / "weights", root / "lora_state.pt")
    shared = [k for k in adapters_only if torch.is_tensor(adapters_only[k])]
    assert len(shared) == 3 * 4 * 2
    for name in shared:
        assert torch.equal(adapters_only[name], trained[name]), name
    adapters = sorted(k for k in trained if ".adapter." in k and k.startswith("module.") and k.endswith(".weight"))
    assert len(adapters) == 4 * 2  # A and B of qkv, proj, fc1, fc2 (stacked over the 2 layers)
    for name in adapters:  # B starts at zero: a B that moved proves the reference had something to switch off
        if name.endswith("linear_out.weight"):
            assert trained[name].shape[0] == 2 and (trained[name].flatten(1).abs().amax(1) > 0).all(), name
    for name, value in base.items():
        if name.startswith("module.") and torch.is_tensor(value):
            assert torch.equal(trained[name], value), f"{name}: a frozen base weight changed"
    moments = sorted(k for k in trained if k.startswith("optimizer.state.exp_avg."))
    assert moments and all(".adapter." in k for k in moments), moments
    from nemo_dft.modeling.lora import checkpoint_has_adapters

    assert checkpoint_has_adapters(last_checkpoint(root / "lora")) and not checkpoint_has_adapters(runs["base"])
    assert not (root / "lora" / "reference").exists()  # no saved copy of the initial weights
    assert (root / "full" / "reference").exists()
    memory = json.loads((root / "lora" / "memory.json").read_text())
    full_memory = json.loads((root / "full" / "memory.json").read_text())
    assert memory["optimizer_state_bytes_per_rank"][0] < full_memory["optimizer_state_bytes_per_rank"][0] / 5


def test_killed_lora_run_resumes_bit_exactly(runs, tmp_path):
    """SIGKILL after the first (adapter-only) checkpoint, rerun: the base comes from model.init_from,
    the adapters and state from the checkpoint; same metrics, u table, adapters and Adam state as an
    uninterrupted run (adapter dropout and model dropout on, so the generators must be restored too)."""
    import subprocess
    import time

    from tests.conftest import REPO, kill_process_tree, subprocess_env
    from tests.training.test_resume import ARGS, assert_same_run, complete_last_checkpoints, metrics

    extra = ["peft.scheme=lora", "peft.dropout=0.1", "dft.reference=frozen", "log.tensorboard=false",
             f"model.init_from={runs['base']}"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "scripts/train_dft.py", f"run.dir={run_dir}", *ARGS, *extra]

    uninterrupted = tmp_path / "uninterrupted"
    assert run_child(command(uninterrupted)).returncode == 0
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(run_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=subprocess_env())
    deadline = time.time() + 600
    while not ((run_dir / "checkpoints").exists() and complete_last_checkpoints(run_dir)):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill_process_tree(process)
    assert len(metrics(run_dir)) < 10, "the kill came too late to test a resume"
    result = run_child(command(run_dir))
    assert result.returncode == 0, result.stderr[-6000:]
    assert_same_run(run_dir, uninterrupted)
    [ours] = complete_last_checkpoints(run_dir)
    [theirs] = complete_last_checkpoints(uninterrupted)
    resumed = full_state(ours / "weights", tmp_path / "resumed.pt")
    reference = full_state(theirs / "weights", tmp_path / "reference.pt")
    trained = [k for k in reference if ".adapter." in k and k.endswith(".weight")]
    assert trained and any(k.startswith("optimizer.state.exp_avg.") for k in trained)
    for key in trained:
        assert torch.equal(resumed[key], reference[key]), key
    assert all(".adapter." in k for k in tensor_keys(ours) if k.startswith("module."))  # adapter-only


def test_changed_or_missing_base_is_refused(runs, tmp_path):
    """An adapter-only run stopped after step 2, resumed after its model.init_from was replaced by
    another model of the same shapes (the full fine-tuning run's checkpoint: the base retrained), and
    after it was removed: exit 2, one error line naming the checkpoint and the base, nothing trained.
    The export of such a checkpoint is refused the same way."""
    import shutil

    from nemo_dft.convert.errors import ConfigMismatchError
    from nemo_dft.convert.load import adapter_checkpoint_base

    base = tmp_path / "base"
    shutil.copytree(runs["base"], base)
    run_dir = tmp_path / "lora"
    launch(run_dir, "trainer.max_steps=3", f"model.init_from={base}", *LORA, "checkpoint.every_n_steps=1")
    checkpoints = run_dir / "checkpoints"
    for name in ("step=3", "step=3-last"):  # as if stopped after step 2 (a finished run would be a no-op)
        shutil.rmtree(checkpoints / name)
    stopped = checkpoints / "step=2-last"
    (checkpoints / "step=2").rename(stopped)
    (run_dir / "metrics.jsonl").write_text("".join((run_dir / "metrics.jsonl").read_text().splitlines(True)[:2]))
    assert adapter_checkpoint_base(stopped) == base.absolute()  # the untouched base is accepted
    shutil.rmtree(base)
    shutil.copytree(last_checkpoint(runs["root"] / "full"), base)  # same names and shapes, other weights
    for label in ("changed", "missing"):
        if label == "missing":
            shutil.rmtree(base)
        result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *COMMON,
                                          "trainer.max_steps=3", f"model.init_from={base}", *LORA,
                                          "checkpoint.every_n_steps=1"))
        assert result.returncode == 2, f"{label}:\n{result.stderr[-4000:]}"
        [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert str(stopped) in line and str(base) in line, line
        assert ("different weights" if label == "changed" else "does not exist") in line, line
        assert "Traceback" not in result.stderr
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        with pytest.raises(ConfigMismatchError, match="different weights" if label == "changed" else "does not"):
            adapter_checkpoint_base(stopped)


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_memory_plan_static_part_is_what_the_run_held(runs, variant):
    """scripts/memory_plan.py's static part (weights, gradients, main weights, Adam moments, reference
    copy) for the run's own config, against the bytes the run reported in memory.json: exact (fp32,
    one rank).  LoRA: frozen base weights plus adapters, gradients and moments of the adapters only,
    no reference copy; full fine-tuning: all of them and the copy."""
    from nemo_dft.config.training import load_config
    from nemo_dft.demo.tiny_model import TINY_VOCAB_SIZE
    from nemo_dft.modeling.gpt_config import make_gpt_config
    from nemo_dft.training.memory_plan import plan_for_run, static_memory

    root = runs["root"]
    steps = ["trainer.max_steps=3", f"model.init_from={runs['base']}"]  # as the fixture ran it
    cfg = load_config(None, [*COMMON, *steps, *(LORA if variant == "lora" else [])])
    shape, layout = plan_for_run(cfg, make_gpt_config(cfg, on_gpu=False), TINY_VOCAB_SIZE)
    planned = static_memory(shape, layout)
    memory = json.loads((root / variant / "memory.json").read_text())
    held = {"weights": memory["weight_bytes_per_rank"], "gradients": memory["gradient_bytes_per_rank"],
            "main_weights": [0], "optimizer_moments": memory["optimizer_state_bytes_per_rank"],
            "reference": memory["reference_bytes_per_rank"]}
    print(variant, {name: (planned[name], value[0]) for name, value in held.items()})
    for name, value in held.items():
        assert [planned[name]] == value, f"{variant}: {name} planned {planned[name]:.0f} B, held {value}"
    trainable = shape.adapters.parameters if variant == "lora" else shape.parameters
    assert memory["trainable_parameters_per_rank"] == [trainable]
    if variant == "lora":  # rank 4 on the four targets of both layers, counted by hand
        assert trainable == 2 * 4 * ((128 + 256) + (128 + 128) + (128 + 768) + (384 + 128))
        assert planned["reference"] == 0 and memory["reference_bytes_per_rank"] == [0]
    else:
        assert planned["reference"] == planned["weights"] > 0
