"""HF -> NeMo -> HF on tiny random Mistral, Llama (2 and 3.1), Qwen2 and Qwen3 models: exact
weights, matching logits.

All conversions run in this process, so NeMo is imported once for the module; each variant is
converted once and shared by the tests that need it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_dft.convert import api, cli
from nemo_dft.convert.errors import ConfigMismatchError
from nemo_dft.data.io import umask

pytestmark = pytest.mark.slow

# (arch, tied embeddings, sliding window); the 16-token window is shorter than the test inputs.
VARIANTS = [
    ("mistral", False, None),
    ("mistral", True, None),
    ("llama", False, None),
    ("llama", True, None),
    ("mistral", False, 16),
    ("qwen2", False, None),
    ("qwen2", True, None),
    ("qwen3", False, None),
    ("qwen3", True, None),
    ("llama31", True, None),  # Llama 3.2 1B/3B: llama3 rope scaling and tied embeddings
]
IDS = ["mistral-untied", "mistral-tied", "llama-untied", "llama-tied", "mistral-window16", "qwen2-untied",
       "qwen2-tied", "qwen3-untied", "qwen3-tied", "llama31-tied"]
FP32_ATOL = 1e-5  # measured: < 6e-7 on every variant


@dataclass
class Converted:
    source: Path
    nemo: Path
    hf: Path
    import_s: float
    export_s: float


@pytest.fixture(scope="module")
def convert(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Converted]:
    """``convert(arch, tied, window=None)``: import then export that variant once per module."""
    done: dict[tuple[str, bool, int | None], Converted] = {}

    def run(arch: str, tied: bool, window: int | None = None) -> Converted:
        if (arch, tied, window) not in done:
            source = tiny_hf(arch, tied, window)
            root = tmp_path_factory.mktemp(f"{arch}-{'tied' if tied else 'untied'}-{window}")
            start = time.perf_counter()
            nemo = api.import_hf(source, root / "nemo")
            middle = time.perf_counter()
            hf = api.export_hf(nemo, root / "hf")
            done[(arch, tied, window)] = Converted(
                source, nemo, hf, middle - start, time.perf_counter() - middle
            )
        return done[(arch, tied, window)]

    return run


@pytest.mark.parametrize(("arch", "tied", "window"), VARIANTS, ids=IDS)
def test_roundtrip_is_bit_identical(convert, arch: str, tied: bool, window: int | None) -> None:
    result = convert(arch, tied, window)
    original = load_file(str(result.source / "model.safetensors"))
    exported = load_file(str(result.hf / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert ("lm_head.weight" in original) is not tied
    norms = [name for name in original if "norm" in name]
    assert norms and all(not torch.all(original[name] == 1) for name in norms), "norms must be non-trivial"
    family_weights = {"qwen2": ("q_proj.bias", "k_proj.bias", "v_proj.bias"), "qwen3": ("q_norm.", "k_norm.")}
    for part in family_weights.get(arch, ()):  # Qwen2's q/k/v biases, Qwen3's per-head q/k norms
        found = [name for name in original if part in name]
        assert len(found) == 2 and all(original[name].abs().min() > 0 for name in found), (part, found)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(exported[name], tensor), name
    print(f"{arch} tied={tied}: import {result.import_s:.1f} s, export {result.export_s:.1f} s")


@pytest.mark.parametrize(("arch", "tied", "window"), VARIANTS, ids=IDS)
def test_roundtrip_keeps_config_tokenizer_and_chat_template(
    convert, arch: str, tied: bool, window: int | None
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = convert(arch, tied, window)
    assert json.loads((result.hf / "config.json").read_text()) == json.loads(
        (result.source / "config.json").read_text()
    )
    source_tok = AutoTokenizer.from_pretrained(str(result.source))
    exported_tok = AutoTokenizer.from_pretrained(str(result.hf))
    assert exported_tok.chat_template and exported_tok.chat_template == source_tok.chat_template
    chat = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    assert exported_tok.apply_chat_template(chat) == source_tok.apply_chat_template(chat)
    model = AutoModelForCausalLM.from_pretrained(str(result.hf))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


def _random_tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("arch", "tied", "window"), VARIANTS, ids=IDS)
def test_imported_logits_match_hf(convert, arch: str, tied: bool, window: int | None) -> None:
    from nemo.lightning import teardown

    from nemo_dft.convert.load import load_nemo_model
    from nemo_dft.convert.logits import hf_logits, load_hf_model, nemo_logits

    result = convert(arch, tied, window)
    hf_model = load_hf_model(result.source)
    tokens = _random_tokens(hf_model.config.vocab_size)
    nemo_model, trainer = load_nemo_model(result.nemo, dtype=torch.float32)
    try:
        expected = hf_logits(hf_model, tokens)
        actual = nemo_logits(nemo_model, tokens)
    finally:
        teardown(trainer, nemo_model)
    # no padded vocabulary rows: they would join the softmax of every log-prob DFT scores
    assert actual.shape == expected.shape
    diff = (expected - actual).abs().max().item()
    print(f"{arch} tied={tied} window={window}: max abs logit diff {diff:.2e}")
    assert diff < FP32_ATOL
    assert torch.equal(expected.argmax(-1), actual.argmax(-1))


NEW_FAMILIES = [("qwen2", False), ("qwen3", True), ("llama31", True)]


@pytest.mark.parametrize(("arch", "tied"), NEW_FAMILIES, ids=["qwen2", "qwen3", "llama31"])
def test_new_family_export_generates_like_the_source_and_verifies(
    convert, arch: str, tied: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exported directory loads in transformers and generates the source model's greedy tokens;
    ``convert_hf.py verify`` passes at 1e-5 on the imported checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = convert(arch, tied)
    tokenizer = AutoTokenizer.from_pretrained(str(result.hf))
    chat = [{"role": "user", "content": "Repeat: c a t"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outputs = [AutoModelForCausalLM.from_pretrained(str(path)).generate(**inputs, max_new_tokens=4, do_sample=False)
               for path in (result.source, result.hf)]
    assert outputs[1].shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(outputs[0], outputs[1])
    status = cli.main(["verify", "--hf", str(result.source), "--nemo", str(result.nemo), "--atol", "1e-5"])
    assert status == 0, capsys.readouterr().err


def test_llama31_rope_scaling_reaches_nemo_and_matters(convert) -> None:
    """All four llama3 factors land in NeMo's Llama31Config; with NeMo's defaults for the three it
    does not import, the logits would differ, so the parity test above is sensitive to them."""
    from nemo.collections.llm.gpt.model.llama import Llama31Config
    from nemo.lightning import io
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_dft.convert.logits import hf_logits, load_hf_model
    from tests.convert.conftest import LLAMA31_ROPE_SCALING

    result = convert("llama31", True)
    config = io.load_context(str(result.nemo), subpath="model.config")
    assert isinstance(config, Llama31Config)
    assert (config.scale_factor, config.low_freq_factor, config.high_freq_factor, config.old_context_len) == (
        LLAMA31_ROPE_SCALING["factor"], LLAMA31_ROPE_SCALING["low_freq_factor"],
        LLAMA31_ROPE_SCALING["high_freq_factor"], LLAMA31_ROPE_SCALING["original_max_position_embeddings"])
    tokens = _random_tokens(512)
    expected = hf_logits(load_hf_model(result.source), tokens)
    hf_config = AutoConfig.from_pretrained(str(result.source))
    hf_config.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}  # NeMo's Llama31Config defaults
    defaults = AutoModelForCausalLM.from_pretrained(str(result.source), config=hf_config).float().eval()
    assert (hf_logits(defaults, tokens) - expected).abs().max().item() > 1e-3


def test_logit_check_detects_a_wrong_norm(convert) -> None:
    """The parity check is sensitive to exactly the failure the norm-name fix prevents."""
    from nemo.lightning import teardown

    from nemo_dft.convert.load import load_nemo_model
    from nemo_dft.convert.logits import compare_logits, load_hf_model
    from nemo_dft.convert.mapping import unwrap_module

    result = convert("mistral", False)
    hf_model = load_hf_model(result.source)
    nemo_model, trainer = load_nemo_model(result.nemo, dtype=torch.float32)
    try:
        inputs = [("random", _random_tokens(hf_model.config.vocab_size)[:1])]
        assert compare_logits(hf_model, nemo_model, inputs).max_abs_diff < FP32_ATOL
        norm = unwrap_module(nemo_model).decoder.layers[0].input_layernorm.weight
        with torch.no_grad():
            norm.fill_(1.0)  # what a dropped norm mapping leaves behind
        assert compare_logits(hf_model, nemo_model, inputs).max_abs_diff > 1e-3
    finally:
        teardown(trainer, nemo_model)


def test_verify_reports_max_difference(convert, capsys: pytest.CaptureFixture[str]) -> None:
    result = convert("llama", False)
    report = api.verify(result.source, result.nemo)
    assert report.max_abs_diff < FP32_ATOL
    assert len(report.per_input) == 5 and report.argmax_agreement == 1.0
    status = cli.main(["verify", "--hf", str(result.hf), "--nemo", str(result.nemo), "--atol", "1e-5"])
    assert status == 0
    assert "max abs logit diff" in capsys.readouterr().out


def test_verify_fails_for_a_different_model(convert, tiny_hf) -> None:
    other = tiny_hf("mistral", True)  # same shapes, different weights
    status = cli.main(["verify", "--hf", str(other), "--nemo", str(convert("mistral", False).nemo)])
    assert status == 1


def test_export_casts_to_requested_dtype(convert, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = convert("mistral", False)
    out = api.export_hf(result.nemo, tmp_path / "bf16", dtype="bf16")
    original = load_file(str(result.source / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").dtype == torch.bfloat16


def test_export_rejects_mismatched_arch(convert, tmp_path: Path) -> None:
    with pytest.raises(ConfigMismatchError, match="--arch llama was requested .* mistral"):
        api.export_hf(convert("mistral", False).nemo, tmp_path / "out", arch="llama")


def test_cpu_overrides_keep_the_sliding_window() -> None:
    import nemo.collections.llm as llm

    from nemo_dft.convert.cpu import apply_cpu_model_overrides

    config = apply_cpu_model_overrides(llm.MistralConfig7B(num_layers=2))
    assert config.window_size == (4096, 0)
    assert config.attention_backend.name == "local"
    assert config.masked_softmax_fusion is False and config.use_cpu_initialization is True
    assert "window_size" not in config.__io__.__arguments__  # by assignment: not saved in context


def _gpt_subclass() -> type:
    import nemo.collections.llm as llm

    class TinyDFTModel(llm.GPTModel):
        """Stands in for the trainer's DFTModel: a GPTModel subclass with no connectors of its own."""

    TinyDFTModel.__module__, TinyDFTModel.__qualname__ = __name__, "TinyDFTModel"
    return TinyDFTModel


TinyDFTModel = None  # set on first use; a module attribute so NeMo's context can name the class


def test_gptmodel_subclass_import_and_export_via_nemo_api(tiny_hf, tmp_path: Path) -> None:
    """``register_hf_connectors`` makes llm.import_ckpt / llm.export_ckpt work for a subclass."""
    import nemo.collections.llm as llm

    from nemo_dft.convert import register_hf_connectors

    global TinyDFTModel
    TinyDFTModel = TinyDFTModel or _gpt_subclass()
    source = tiny_hf("llama", True)
    nemo = api.import_hf(source, tmp_path / "nemo", model_cls=TinyDFTModel)
    assert "TinyDFTModel" in (nemo / "context" / "model.yaml").read_text()
    register_hf_connectors(TinyDFTModel)
    out = llm.export_ckpt(str(nemo), "hf", output_path=str(tmp_path / "hf"))
    original = load_file(str(source / "model.safetensors"))
    exported = load_file(str(Path(out) / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())


ARCH_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "rope_scaling", "vocab_size",
             "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
             "max_position_embeddings", "bos_token_id", "eos_token_id")


@pytest.mark.parametrize(("arch", "tied", "window"), VARIANTS, ids=IDS)
def test_exported_config_says_what_the_imported_one_said(convert, arch: str, tied: bool, window: int | None) -> None:
    """Every architecture key of config.json survives the round trip (sliding_window included)."""
    import json

    result = convert(arch, tied, window)
    source = json.loads((result.source / "config.json").read_text())
    exported = json.loads((result.hf / "config.json").read_text())
    differing = {key: (source.get(key), exported.get(key)) for key in ARCH_KEYS
                 if key in source and source.get(key) != exported.get(key)}
    assert not differing, differing
    group_mode = 0o666 & ~umask()
    modes = {path.name: path.stat().st_mode & 0o777 for path in result.hf.iterdir() if path.is_file()}
    assert set(modes.values()) == {group_mode}, modes
