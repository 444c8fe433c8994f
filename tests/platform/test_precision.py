"""Precision and FP8 settings reach megatron-core's config through NeMo's plugin; FP8 where it
cannot run is refused at start."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from nemo_dft.config.training import ConfigError, load_config
from nemo_dft.platform.precision import FP8Unavailable, check_fp8_supported, plugin_arguments, precision_plugin
from tests.conftest import REPO, subprocess_env

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def apply_plugin(*overrides: str):
    """The tiny Mistral config after NeMo's plugin applied its dtype settings (as at model setup)."""
    from nemo.lightning.pytorch.plugins.mixed_precision import update_config_with_dtype_overrides

    from nemo_dft.modeling.gpt_config import make_gpt_config

    cfg = load_config(None, list(overrides))
    config = make_gpt_config(cfg, on_gpu=True)  # the GPU config: the CPU overrides would hide nothing here
    return update_config_with_dtype_overrides(precision_plugin(cfg.model).dtype_config, config)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_settings_map_onto_megatron_config(recipe):
    config = apply_plugin("model.precision=bf16", "model.fp8=hybrid", f"model.fp8_recipe={recipe}",
                          "model.fp8_amax_history_len=16", "model.fp8_amax_compute_algo=most_recent",
                          "model.fp8_param=true")
    assert (config.fp8, config.fp8_recipe) == ("hybrid", recipe)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (16, "most_recent")
    assert config.fp8_param is True
    assert config.bf16 and not config.fp16 and config.params_dtype == torch.bfloat16


def test_without_fp8_megatron_config_has_none():
    config = apply_plugin("model.precision=bf16")
    assert config.fp8 is None and config.bf16 and config.params_dtype == torch.bfloat16
    fp32 = apply_plugin()
    assert fp32.fp8 is None and not fp32.bf16 and fp32.params_dtype == torch.float32


@pytest.mark.parametrize("precision,expected", [("fp32", "32"), ("bf16", "bf16-mixed"), ("fp16", "16-mixed")])
def test_lightning_precision(precision, expected):
    cfg = load_config(None, [f"model.precision={precision}"])
    assert plugin_arguments(cfg.model)["precision"] == expected


@pytest.mark.parametrize("overrides,key", [
    (["model.fp8=hybrid"], "model.fp8: FP8 needs model.precision bf16 or fp16"),
    (["model.precision=bf16", "model.fp8=e5m2"], "model.fp8: 'e5m2' is not one of"),
    (["model.precision=bf16", "model.fp8=hybrid", "model.fp8_recipe=nvfp4"], "model.fp8_recipe: 'nvfp4'"),
    (["model.precision=tf32"], "model.precision: 'tf32'"),
])
def test_invalid_settings_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_fp8_where_it_cannot_run_is_refused():
    cfg = load_config(None, ["model.precision=bf16", "model.fp8=hybrid"])
    expected = "needs a CUDA GPU" if HAVE_TE else "needs Transformer Engine, which is not installed"
    with pytest.raises(FP8Unavailable, match=expected):
        check_fp8_supported(cfg.model, on_gpu=torch.cuda.is_available())
    check_fp8_supported(load_config(None, ["model.precision=bf16"]).model, on_gpu=False)  # no FP8: fine


def test_training_script_refuses_fp8_at_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/train_dft.py", f"run.dir={tmp_path}", "model.precision=bf16", "model.fp8=hybrid"],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: model.fp8: FP8 training needs" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
