"""The memory keys: validated before anything is built, mapped onto megatron's configs, and the
optimizer-state report finds the torch optimizer inside NeMo's and megatron's wrappers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nemo_dft.config.training import ConfigError, load_config
from nemo_dft.platform import memory
from nemo_dft.training.memory_report import optimizer_state_bytes, torch_optimizers

BAD = [
    (["model.overlap_param_gather=true"], "model.overlap_param_gather"),
    (["model.recompute_granularity=everything"], "model.recompute_granularity"),
    (["model.recompute_granularity=full"], "model.recompute_method"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform"], "model.recompute_num_layers"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3"],
     "model.recompute_num_layers"),  # the tiny model has 2 layers
    (["model.recompute_method=uniform"], "model.recompute_method"),
    (["model.sequence_parallel=true"], "model.sequence_parallel"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[";".join(o) for o, _ in BAD])
def test_impossible_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_valid_settings_map_onto_megatron_configs():
    cfg = load_config(None, ["model.use_distributed_optimizer=true", "model.overlap_grad_reduce=true",
                             "model.overlap_param_gather=true", "model.grad_reduce_in_fp32=false",
                             "model.recompute_granularity=full", "model.recompute_method=block",
                             "model.recompute_num_layers=1"])
    ddp = memory.ddp_config(cfg.model)
    assert (ddp.use_distributed_optimizer, ddp.overlap_grad_reduce, ddp.overlap_param_gather,
            ddp.grad_reduce_in_fp32) == (True, True, True, False)
    assert memory.transformer_fields(cfg.model) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1,
        "sequence_parallel": False,
    }
    selective = load_config(None, ["model.recompute_granularity=selective"])
    assert memory.transformer_fields(selective.model)["recompute_granularity"] == "selective"


def test_gpt_config_carries_the_memory_fields():
    from nemo_dft.modeling.gpt_config import make_gpt_config

    cfg = load_config(None, ["model.recompute_granularity=full", "model.recompute_method=uniform",
                             "model.recompute_num_layers=1"])
    config = make_gpt_config(cfg, on_gpu=True)
    recompute = (config.recompute_granularity, config.recompute_method, config.recompute_num_layers)
    assert recompute == ("full", "uniform", 1)
    assert config.sequence_parallel is False


def test_sequence_parallel_needs_a_gpu_with_transformer_engine():
    cfg = load_config(None, ["trainer.devices=2", "model.tensor_model_parallel_size=2", "model.sequence_parallel=true"])
    with pytest.raises(ValueError, match="^model.sequence_parallel: needs Transformer Engine"):
        memory.check_sequence_parallel_supported(cfg.model, on_gpu=False)
    memory.check_sequence_parallel_supported(load_config(None, []).model, on_gpu=False)  # off: nothing to check


def test_optimizer_state_is_found_inside_wrappers():
    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    adam = torch.optim.Adam(params)
    sum(p.sum() for p in params).backward()
    adam.step()
    wrapped = SimpleNamespace(mcore_optimizer=SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)]))
    assert torch_optimizers(wrapped) == [adam]
    moments = 2 * (7 * 3 + 5) * 4  # exp_avg and exp_avg_sq, fp32
    assert optimizer_state_bytes([wrapped]) == moments
