"""A rerun's config against the saved one: immutable keys refused by name, mutable ones reported."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_dft.config.loading import ConfigError
from nemo_dft.config.rerun import check_rerun
from nemo_dft.config.training import load_config


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "config.yaml"
    OmegaConf.save(load_config(None, ["trainer.max_steps=10"]), path)
    return path


@pytest.mark.parametrize("override", ["optim.lr=0.1", "dft.tau=0.5", "data.max_length=80", "run.seed=7",
                                      "model.global_batch_size=16", "tokenizer.chat_template=zephyr",
                                      "dft.num_negatives=1", "model.config.num_layers=3", "optim.warmup_ratio=0.2"])
def test_immutable_change_is_refused_naming_the_key(saved, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        check_rerun(saved, load_config(None, ["trainer.max_steps=10", override]))
    assert "new run.dir" in str(err.value) and str(saved) in str(err.value)


def test_mutable_changes_are_reported(saved):
    changes = check_rerun(saved, load_config(None, ["trainer.max_steps=12", "checkpoint.every_n_steps=3",
                                                    "model.micro_batch_size=2", "data.num_epochs=5"]))
    assert changes == ["checkpoint.every_n_steps: 0 -> 3", "data.num_epochs: 4 -> 5", "model.micro_batch_size: 4 -> 2",
                       "trainer.max_steps: 10 -> 12"]
    assert check_rerun(saved, load_config(None, ["trainer.max_steps=10"])) == []


def test_unreadable_saved_config_is_reported(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="unreadable"):
        check_rerun(path, load_config(None, []))
