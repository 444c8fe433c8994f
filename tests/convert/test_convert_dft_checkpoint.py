"""Export of checkpoints written by DFT training (TP=1 and TP=2) to HF, checked by logits."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# The runs of tests/training/test_parallel_layouts.py (3 steps from the shared initial checkpoint),
# trained once per session for both files: DFT with its frozen reference (the default objective) on
# one process, and DFT2 at TP = 2.
TRAINED = {1: "frozen_tp1_pp1_dp1_mb4", 2: "tp2_pp1_dp1_mb4"}


@pytest.mark.parametrize("tp", [1, 2])
def test_dft_checkpoint_exports_to_hf_with_matching_logits(shared_runs, initial_checkpoint, tmp_path, tp):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nemo_dft.convert import export_hf, verify
    from nemo_dft.data.io import umask
    from nemo_dft.demo.tiny_model import tiny_hf_model_dir
    from tests.training.test_parallel_layouts import LAYOUTS, last_checkpoint, layout_run

    assert LAYOUTS[TRAINED[tp]][0] == tp
    checkpoint = last_checkpoint(layout_run(shared_runs, initial_checkpoint, TRAINED[tp])).parent
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.model_type == "mistral" and model.config.num_hidden_layers == 2
    # the tiny preset is the tiny HF model's shape: no sliding window, as the HF model says
    tiny_config = AutoConfig.from_pretrained(tiny_hf_model_dir("mistral"))
    assert tiny_config.sliding_window is None and model.config.sliding_window is None
    group_mode = 0o666 & ~umask()
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in hf_dir.iterdir() if p.is_file()} == {
        p.name: oct(group_mode) for p in hf_dir.iterdir() if p.is_file()}
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    inputs = tokenizer("Repeat: c a t", return_tensors="pt")
    assert "token_type_ids" not in inputs
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
    comparison = verify(hf_dir, checkpoint)
    assert comparison.max_abs_diff < 1e-5, comparison.summary()
