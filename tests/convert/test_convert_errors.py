"""Fast checks (no NeMo import): input validation, error messages, CLI surface, mapping fixes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nemo_dft.convert import api, arch, cli, mapping
from nemo_dft.convert.errors import (
    ConfigMismatchError,
    ConversionError,
    MissingFileError,
    UnsupportedArchitectureError,
)


@pytest.fixture
def hf_copy(tiny_hf, tmp_path: Path) -> Path:
    """An editable copy of the tiny Mistral checkpoint (config, tokenizer, weights)."""
    out = tmp_path / "hf"
    shutil.copytree(tiny_hf("mistral", False), out)
    return out


def _edit_config(hf_dir: Path, **changes: object) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_detects_supported_architectures(tiny_hf) -> None:
    assert arch.detect_hf_arch(tiny_hf("mistral", False)) == "mistral"
    assert arch.detect_hf_arch(tiny_hf("llama", False), "llama") == "llama"
    assert arch.detect_hf_arch(tiny_hf("qwen2", False)) == "qwen2"
    assert arch.detect_hf_arch(tiny_hf("qwen3", False), "qwen3") == "qwen3"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_is_refused_by_name(hf_copy: Path, model_type: str) -> None:
    _edit_config(hf_copy, model_type=model_type)
    with pytest.raises(UnsupportedArchitectureError, match=f"model_type='{model_type}' is a mixture-of-experts"):
        arch.detect_hf_arch(hf_copy)


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
        ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.type='yarn'.* qwen2"),
        ("qwen3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type='llama3'"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "only 'llama3' converts"),
    ],
)
def test_rope_scaling_and_windows_nemo_cannot_express(tiny_hf, tmp_path: Path, family: str, changes: dict,
                                                      message: str) -> None:
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf(family, False), hf_dir)
    _edit_config(hf_dir, **changes)
    with pytest.raises(ConfigMismatchError, match=message) as err:
        arch.detect_hf_arch(hf_dir)
    assert str(hf_dir / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_unsupported_architecture_names_file_and_model_type(hf_copy: Path) -> None:
    _edit_config(hf_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        UnsupportedArchitectureError, match=r"config\.json: model_type='gpt2'.*GPT2LMHeadModel"
    ):
        arch.detect_hf_arch(hf_copy)


def test_requested_arch_must_match_checkpoint(hf_copy: Path) -> None:
    with pytest.raises(
        ConfigMismatchError, match="--arch llama was requested but .* describes a mistral model"
    ):
        arch.detect_hf_arch(hf_copy, "llama")
    with pytest.raises(UnsupportedArchitectureError, match="--arch 'gemma'"):
        arch.detect_hf_arch(hf_copy, "gemma")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type='dynamic'"),
        ({"intermediate_size": None}, "key 'intermediate_size' is missing"),
    ],
)
def test_unconvertible_config_features(hf_copy: Path, changes: dict, message: str) -> None:
    _edit_config(hf_copy, **changes)
    with pytest.raises(ConfigMismatchError, match=message) as err:
        arch.detect_hf_arch(hf_copy)
    assert str(hf_copy / "config.json") in str(err.value)


def test_missing_files_are_named(hf_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        arch.detect_hf_arch(tmp_path / "nowhere")
    (hf_copy / "config.json").unlink()
    with pytest.raises(MissingFileError, match=r"config\.json: missing"):
        arch.detect_hf_arch(hf_copy)
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="no weights found"):
        arch.check_hf_dir(hf_copy)


def test_missing_tokenizer_is_an_error(hf_copy: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_copy / name).unlink()
    with pytest.raises(MissingFileError, match="no tokenizer found"):
        arch.check_hf_dir(hf_copy)


def test_nemo_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        arch.check_nemo_dir(tmp_path / "none")
    (tmp_path / "weights").mkdir()
    with pytest.raises(MissingFileError, match=r"context: missing"):
        arch.check_nemo_dir(tmp_path)
    (tmp_path / "context").mkdir()
    arch.check_nemo_dir(tmp_path)
    (tmp_path / "weights" / "adapter_metadata.json").write_text("{}")
    with pytest.raises(ConfigMismatchError, match="PEFT"):
        arch.check_nemo_dir(tmp_path)


def _config(class_name: str, **fields: object) -> object:
    """A stand-in for a NeMo config: only the class name and the attributes matter."""
    defaults = {"normalization": "RMSNorm", "gated_linear_unit": True, "position_embedding_type": "rope"}
    return type(class_name, (), {**defaults, **fields})()


def test_detect_nemo_arch_from_config_class() -> None:
    assert arch.detect_nemo_arch(_config("MistralConfig7B")) == "mistral"
    assert arch.detect_nemo_arch(_config("LlamaConfig")) == "llama"
    assert arch.detect_nemo_arch(_config("GPTConfig"), "llama") == "llama"
    with pytest.raises(UnsupportedArchitectureError, match="pass --arch"):
        arch.detect_nemo_arch(_config("GPTConfig"))
    with pytest.raises(UnsupportedArchitectureError, match="Llama4Config"):
        arch.detect_nemo_arch(_config("Llama4Config"))
    with pytest.raises(ConfigMismatchError, match="--arch llama was requested"):
        arch.detect_nemo_arch(_config("MistralConfig7B"), "llama", where="ckpt/context")


def test_detect_nemo_arch_for_qwen_configs() -> None:
    """The most derived known class wins: NeMo's Qwen3Config derives from Qwen2Config (stand-ins)."""
    qwen2 = type("Qwen2Config", (), {})
    qwen3 = type("Qwen3Config", (qwen2,), {})
    llama31 = type("Llama31Config", (type("LlamaConfig", (), {}),), {})
    fields = {"normalization": "RMSNorm", "gated_linear_unit": True, "position_embedding_type": "rope"}

    def config(cls: type, **values: object) -> object:
        return type(cls.__name__, (cls,), {**fields, **values})()

    assert arch.detect_nemo_arch(config(qwen2, add_qkv_bias=True)) == "qwen2"
    assert arch.detect_nemo_arch(config(qwen3, qk_layernorm=True)) == "qwen3"
    assert arch.detect_nemo_arch(config(llama31)) == "llama"
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3MoEConfig"):
        arch.detect_nemo_arch(_config("Qwen3MoEConfig"))
    with pytest.raises(ConfigMismatchError, match="qk_layernorm=False, but an HF qwen3 checkpoint needs True"):
        arch.detect_nemo_arch(config(qwen3, qk_layernorm=False))
    with pytest.raises(ConfigMismatchError, match="add_qkv_bias=True, but an HF llama checkpoint needs False"):
        arch.detect_nemo_arch(_config("GPTConfig", add_qkv_bias=True), "llama")


def test_nemo_config_mismatch_names_key() -> None:
    with pytest.raises(ConfigMismatchError, match="ckpt: normalization='LayerNorm'"):
        arch.detect_nemo_arch(_config("LlamaConfig", normalization="LayerNorm"), where="ckpt")
    with pytest.raises(ConfigMismatchError, match="add_bias_linear=True"):
        arch.detect_nemo_arch(_config("MistralConfig7B", add_bias_linear=True))


def test_existing_output_needs_overwrite(tiny_hf, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        api.import_hf(tiny_hf("mistral", False), tmp_path / "out")
    lock = tmp_path / "out2.lock"
    lock.write_text("")
    with pytest.raises(ConversionError, match="out2.lock: another conversion"):
        api.import_hf(tiny_hf("mistral", False), tmp_path / "out2")


def test_dtype_choices() -> None:
    assert api.parse_dtype("bf16") is torch.bfloat16
    assert api.parse_dtype(None) is None
    with pytest.raises(ConversionError, match="--dtype 'int8'"):
        api.parse_dtype("int8")


def test_hub_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MissingFileError, match="no-such-org/no-such-model: not a local directory.*offline"):
        api.resolve_hf_source("no-such-org/no-such-model")


def test_help_documents_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "import": ["--hf", "--out", "--arch", "--revision", "--overwrite", "--verify"],
        "export": ["--nemo", "--out", "--dtype", "bf16", "--arch", "--tokenizer", "--overwrite", "--verify"],
        "verify": ["--hf", "--nemo", "--prompt", "--random", "--atol"],
    }
    for command, options in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text, f"{command} --help lacks {option}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "exit status" in capsys.readouterr().out


def test_cli_reports_errors_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["import", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert status == 2
    assert "error:" in capsys.readouterr().err
    status = cli.main(["export", "--nemo", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert status == 2
    assert "context: missing" in capsys.readouterr().err


@pytest.mark.parametrize(("model_type", "why"), [
    ("gemma", "scales the embeddings"), ("gemma2", "soft-capping"), ("gemma3", "two RoPE bases"),
    ("gemma3_text", "two RoPE bases"), ("phi3", "fused qkv_proj"), ("mixtral", "mixture-of-experts"),
    ("qwen2_moe", "mixture-of-experts"),
])
def test_import_refuses_families_by_name(hf_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         model_type: str, why: str) -> None:
    """Gemma 1/2/3, Phi-3 and the MoE families: one ``error:`` line naming the model_type and what
    is missing, exit status 2, before NeMo is imported and before anything is written."""
    _edit_config(hf_copy, model_type=model_type)
    status = cli.main(["import", "--hf", str(hf_copy), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and f"model_type='{model_type}'" in lines[0] and why in lines[0], err
    assert not (tmp_path / "out").exists()


def test_norm_names_are_rewritten_only_for_the_local_spec() -> None:
    layer = "decoder.layers.*."
    te_map = {
        "model.layers.*.input_layernorm.weight": layer + "self_attention.linear_qkv.layer_norm_weight",
        "model.layers.*.post_attention_layernorm.weight": layer + "mlp.linear_fc1.layer_norm_weight",
    }
    local, _ = mapping.adapt_mapping(te_map, [], local_names=True, tied=False)
    assert local == {
        "model.layers.*.input_layernorm.weight": "decoder.layers.*.input_layernorm.weight",
        "model.layers.*.post_attention_layernorm.weight": "decoder.layers.*.pre_mlp_layernorm.weight",
    }
    unchanged, _ = mapping.adapt_mapping(te_map, [], local_names=False, tied=False)
    assert unchanged == te_map
    assert mapping.uses_local_norm_names(["decoder.layers.0.input_layernorm.weight"])
    assert not mapping.uses_local_norm_names(["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"])


class _Transform:
    """Shape of NeMo's StateDictTransform: keys plus a function."""

    def __init__(self, source_key: object, target_key: object, transform: object = None) -> None:
        self.source_key, self.target_key, self.transform = source_key, target_key, transform


def test_tied_embeddings_drop_the_output_layer_entries() -> None:
    entries = {"model.norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}
    transforms = [_Transform("output_layer.weight", "lm_head.weight"), _Transform(("a", "b"), "c")]
    kept, kept_transforms = mapping.adapt_mapping(entries, transforms, local_names=False, tied=True)
    assert kept == {"model.norm.weight": "decoder.final_layernorm.weight"}
    assert [t.target_key for t in kept_transforms] == ["c"]


class _Named:
    """Anything with ``named_parameters`` stands in for a model here."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def named_parameters(self) -> list[tuple[str, None]]:
        return [(name, None) for name in self.names]


def test_coverage_check_names_a_weight_the_map_would_drop() -> None:
    source = _Named("model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight")
    target = _Named("decoder.layers.0.input_layernorm.weight", "decoder.layers.0.mlp.linear_fc2.weight")
    full = {
        "model.layers.*.input_layernorm.weight": "decoder.layers.*.input_layernorm.weight",
        "model.layers.*.mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
    }
    mapping.check_coverage(source, target, full, [], where="x")
    partial = dict(list(full.items())[1:])
    with pytest.raises(
        ConfigMismatchError, match=r"x: source weights \['model.layers.0.input_layernorm.weight'\]"
    ):
        mapping.check_coverage(source, target, partial, [], where="x")
    with pytest.raises(
        ConfigMismatchError, match=r"target weights \['decoder.layers.0.input_layernorm.weight'\]"
    ):
        mapping.check_coverage(
            source, target, partial, [_Transform("model.layers.*.input_layernorm.weight", "z")], "x"
        )
