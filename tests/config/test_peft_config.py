"""``peft.*`` settings: bad values are refused before NeMo is imported (exit 2, one line naming the
key); the default is full fine-tuning."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from nemo_dft.config.training import load_config
from tests.conftest import REPO

CASES = {
    "unknown_scheme": (["peft.scheme=qlora"], ["peft.scheme", "qlora"]),
    "rank_0": (["peft.scheme=lora", "peft.dim=0"], ["peft.dim", ">= 1"]),
    "rank_not_divisible_by_tp": (["peft.scheme=lora", "peft.dim=3", "model.tensor_model_parallel_size=2",
                                  "trainer.devices=2"], ["peft.dim", "tensor_model_parallel_size=2"]),
    "alpha_0": (["peft.scheme=lora", "peft.alpha=0"], ["peft.alpha", "> 0"]),
    "dropout_1": (["peft.scheme=lora", "peft.dropout=1.0"], ["peft.dropout", "[0, 1)"]),
    "unknown_target": (["peft.scheme=lora", "peft.target_modules=[linear_qkv,q_proj]"],
                       ["peft.target_modules", "'q_proj'", "linear_fc1"]),
    "no_target": (["peft.scheme=lora", "peft.target_modules=[]"], ["peft.target_modules", "empty"]),
    "unknown_checkpoint": (["peft.checkpoint=base"], ["peft.checkpoint", "'base'", "auto, adapters or full"]),
    # adapters-only checkpoints reload the base from model.init_from; a random init cannot be reloaded
    "adapters_without_init_from": (["peft.scheme=lora", "peft.checkpoint=adapters"],
                                   ["peft.checkpoint", "model.init_from", "peft.checkpoint=full"]),
}


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_dft_script", REPO / "scripts" / "train_dft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", list(CASES))
def test_bad_peft_setting_exits_2_with_one_line(case, train_main, tmp_path, capsys):
    overrides, named = CASES[case]
    code = train_main([f"run.dir={tmp_path / 'run'}", "trainer.progress_bar=false", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for part in named:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_default_is_full_fine_tuning_and_lora_settings_follow_the_config():
    from nemo_dft.modeling.lora import lora_settings

    assert load_config(overrides=[]).peft.scheme is None
    assert lora_settings(load_config(overrides=[])) is None
    cfg = load_config(overrides=["peft.scheme=lora", "peft.dim=4", "peft.alpha=8", "peft.target_modules=[linear_qkv]",
                                 "run.seed=7", "peft.checkpoint=full"])
    assert load_config(overrides=[]).peft.checkpoint == "auto"
    settings = lora_settings(cfg)
    assert (settings.dim, settings.alpha, settings.target_modules, settings.seed, settings.scale) == (
        4, 8.0, ("linear_qkv",), 7, 2.0)


def test_auto_checkpoints_hold_adapters_exactly_when_there_is_a_base(tmp_path):
    from nemo_dft.config.training import checkpoint_contents

    def contents(*overrides: str) -> str:
        return checkpoint_contents(load_config(overrides=list(overrides), check_files=False))

    assert contents("peft.scheme=lora") == "full"  # a random init cannot be reloaded
    assert contents("peft.scheme=lora", f"model.init_from={tmp_path}", "model.preset=checkpoint") == "adapters"
    assert contents("peft.scheme=lora", f"model.init_from={tmp_path}", "model.preset=checkpoint",
                    "peft.checkpoint=full") == "full"
    assert contents(f"model.init_from={tmp_path}", "model.preset=checkpoint") == "full"  # full fine-tuning


def test_validation_does_not_import_nemo():
    code = ("import sys; from nemo_dft.config.training import load_config\n"
            "try:\n    load_config(overrides=['peft.scheme=lora', 'peft.dim=0'])\nexcept Exception as e: print(e)\n"
            "print('nemo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["peft.dim: must be >= 1, got 0", "False"]
