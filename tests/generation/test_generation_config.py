"""Config schema, documented YAML files, seeds, and the command-line entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
from generation_testutils import REPO, reference_seed
from omegaconf import OmegaConf

from nemo_dft.generation.config import ConfigError, GenerationConfig, load_config, validate_for_generation
from nemo_dft.generation.seeds import example_seed


def test_documented_yaml_holds_exactly_the_defaults() -> None:
    assert load_config(REPO / "conf/generate_negatives.yaml") == OmegaConf.structured(GenerationConfig)


def test_defaults_are_the_paper_settings_and_metamath_overrides_them() -> None:
    cfg = load_config(None, [])
    assert cfg.prompt.style == "chat" and cfg.prompt.system_message == "You are an unhelpful assistant."
    s = cfg.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.7, 1.0, 50, 320)
    metamath = load_config(REPO / "conf/generate_negatives_metamath.yaml")
    assert metamath.prompt.style == "template" and metamath.sampling.max_new_tokens == 256
    assert metamath.data.format.layout == "query_response"
    assert (metamath.sampling.temperature, metamath.sampling.top_k) == (0.7, 50)
    # the paper keeps empty samples as negatives, and falls back to zephyr without a chat template
    assert cfg.sampling.on_empty == "keep" and metamath.sampling.on_empty == "keep"
    assert cfg.prompt.fallback_template == "zephyr"


def test_reasoning_recipe_reads_sharegpt_rows_with_their_system_prompt() -> None:
    cfg = load_config(REPO / "conf/generate_negatives_reasoning.yaml")
    validate_for_generation(load_config(REPO / "conf/generate_negatives_reasoning.yaml",
                                        ["model.path=m", "data.input=x", "output.dir=y"]))
    assert cfg.data.format.layout == "sharegpt" and cfg.data.format.system_field == "system"
    assert cfg.prompt.style == "chat" and cfg.prompt.system_message is None  # the rows' own system prompt
    assert cfg.sampling.on_empty == "keep"


def test_unknown_keys_wrong_types_and_missing_required_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="sampling.tempreature"):
        load_config(None, ["sampling.tempreature=0.5"])
    with pytest.raises(ConfigError, match="sampling.n"):
        load_config(None, ["sampling.n=many"])
    with pytest.raises(ConfigError, match="'model.path' is required"):
        validate_for_generation(load_config(None, ["data.input=x", "output.dir=y"]))
    full = ["model.path=m", "data.input=x", "output.dir=y"]
    with pytest.raises(ConfigError, match="'shard.index' must be in"):
        validate_for_generation(load_config(None, [*full, "shard.count=2", "shard.index=2"]))
    with pytest.raises(ConfigError, match="'backend' must be one of"):
        validate_for_generation(load_config(None, [*full, "backend=tgi"]))
    with pytest.raises(ConfigError, match="placeholder"):
        validate_for_generation(load_config(None, [*full, "prompt.style=template", "prompt.template=no"]))
    with pytest.raises(ConfigError, match="'prompt.fallback_template' must be one of"):
        validate_for_generation(load_config(None, [*full, "prompt.fallback_template=chatml"]))
    with pytest.raises(ConfigError, match="'sampling.on_empty' must be one of"):
        validate_for_generation(load_config(None, [*full, "sampling.on_empty=drop"]))


def test_seeds_follow_the_documented_rule_and_separate_ids_and_rounds() -> None:
    for base, example_id in [(0, 0), (0, 17), (1234, "abc"), (7, "0")]:
        assert example_seed(base, example_id) == reference_seed(base, example_id)
        assert example_seed(base, example_id, 2) == reference_seed(base, example_id, 2)
    assert example_seed(0, 1) != example_seed(0, "1")
    assert example_seed(0, 1) != example_seed(1, 1)
    assert len({example_seed(0, i, r) for i in range(50) for r in range(3)}) == 150


@pytest.mark.parametrize("script", ["generate_negatives.py", "merge_negatives.py"])
def test_scripts_print_help_with_every_key(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for key in ("backend=", "sampling.top_k=50", "shard.count=1", "data.format.layout=", "output.dir="):
        assert key in out


def test_script_reports_config_errors_in_one_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/generate_negatives.py"), "data.input=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: 'model.path' is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_local_model_path_is_one_line_before_any_model_loads(tmp_path, capsys) -> None:
    from nemo_dft.generation.cli import main

    loaded = []
    missing = tmp_path / "no-such-model"
    argv = [f"model.path={missing}", "data.input=rows.jsonl", f"output.dir={tmp_path / 'out'}"]
    assert main("generate_negatives.py", "test", lambda cfg: (validate_for_generation(cfg), loaded.append(cfg)),
                argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"generate_negatives.py: error: 'model.path': {missing} does not exist "
                   "(a local model directory, or a hub id org/name)"]
    assert not loaded
    # a hub id is left to the backend (it may be reachable on a cluster)
    validate_for_generation(load_config(None, ["model.path=org/model", "data.input=x", "output.dir=y"]))
