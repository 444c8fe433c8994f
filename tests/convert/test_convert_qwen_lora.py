"""LoRA-DFT on the tiny Qwen2 (q/k/v biases, GQA: 4 query heads in 2 groups) with Qwen's ChatML
tokenizer, exported as an HF PEFT adapter and as merged weights; then negative generation
(``backend=hf``) and ``scripts/evaluate.py`` on the merged export, prompted with its ChatML template.

The adapter of the fused ``linear_qkv`` is cut per query group into q, k and v rows
(nemo_dft/convert/peft_export.py); LoRA leaves the biases alone, so the adapter carries none and the
merged export keeps the base's biases bit for bit.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CHATML_TOKENS, QWEN_CHAT_TEMPLATE, REPO, script_command, subprocess_env
from tests.convert.test_convert_lora import nemo_comparison, train

pytestmark = pytest.mark.slow

TASK = REPO / "nemo_dft" / "demo" / "assets" / "tiny_task"


def run_script(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(script_command(*command), cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=subprocess_env())
    assert result.returncode == 0, f"{command[0]}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_qwen):
    from nemo_dft.convert import export_hf

    hf_base, nemo_base = tiny_qwen("qwen2")
    root = tmp_path_factory.mktemp("qwen2_lora")
    lora = train(root / "lora", 1, "trainer.max_steps=2", "model.preset=checkpoint", f"model.init_from={nemo_base}",
                 f"tokenizer.path={hf_base}", "peft.scheme=lora", "peft.dim=4", "peft.alpha=8", "optim.lr=5e-2",
                 "optim.min_lr=5e-2", "optim.warmup_ratio=0")
    adapter = root / "adapter"
    run_script("scripts/convert_hf.py", "export", "--nemo", str(lora), "--out", str(adapter), "--adapter",
               "--base-model", str(hf_base))
    return {"hf_base": hf_base, "lora": lora, "adapter": adapter, "hf_merged": export_hf(lora, root / "hf_merged")}


def test_qwen2_peft_adapter_on_the_base_gives_the_nemo_logits(exported):
    from nemo_dft.convert.logits import load_hf_model
    from nemo_dft.convert.peft_export import load_hf_with_adapter

    config = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["bias"] == "none"
    tensors = load_file(str(exported["adapter"] / "adapter_model.safetensors"))
    assert not any("bias" in name for name in tensors)
    # GQA rows: q gets 4 heads x 32, k and v 2 groups x 32 each
    layer = "base_model.model.model.layers.0.self_attn"
    assert [tensors[f"{layer}.{p}_proj.lora_B.weight"].shape[0] for p in "qkv"] == [128, 64, 64]
    assert all(tensors[f"{layer}.{p}_proj.lora_B.weight"].abs().max() > 0 for p in "qkv")  # trained, not zero
    with_adapter = nemo_comparison(load_hf_with_adapter(exported["hf_base"], exported["adapter"]),
                                   exported["lora"], exported["hf_base"])
    assert with_adapter.max_abs_diff < 1e-5, with_adapter.summary()
    without = nemo_comparison(load_hf_model(exported["hf_base"]), exported["lora"], exported["hf_base"])
    assert without.max_abs_diff > 1e-3, without.summary()


def test_qwen2_merged_export_keeps_the_biases_and_gives_the_nemo_logits(exported):
    from nemo_dft.convert import verify

    base = load_file(str(exported["hf_base"] / "model.safetensors"))
    merged = load_file(str(exported["hf_merged"] / "model.safetensors"))
    biases = [name for name in base if name.endswith("_proj.bias")]
    assert len(biases) == 6 and all(torch.equal(base[name], merged[name]) for name in biases)
    assert not torch.equal(base["model.layers.0.self_attn.k_proj.weight"],
                           merged["model.layers.0.self_attn.k_proj.weight"])
    comparison = verify(exported["hf_merged"], exported["lora"])
    assert comparison.max_abs_diff < 1e-5, comparison.summary()


def test_generation_and_evaluation_on_the_chatml_export(exported, tmp_path):
    """generate_negatives.py (HF backend) and evaluate.py on the merged export: its tokenizer keeps
    Qwen's ChatML template, both stop at <|im_end|> or <|endoftext|>, no ChatML marker is left in
    the stored text, and evaluate.py scores the generated negatives."""
    from transformers import AutoTokenizer

    from nemo_dft.data.io import read_rows
    from nemo_dft.data.rows import validate_dft_rows
    from nemo_dft.generation.samples import stop_token_ids

    model_dir = exported["hf_merged"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer.chat_template == QWEN_CHAT_TEMPLATE and tokenizer.bos_token is None
    end_of_text, _, im_end = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    assert stop_token_ids(model_dir, None, tokenizer) == {im_end, end_of_text}

    rows = [json.loads(line) for line in (TASK / "heldout.jsonl").read_text().splitlines()[:4]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": row["id"], "messages": row["real"]}) + "\n" for row in rows))
    out = tmp_path / "negatives"
    run_script("scripts/generate_negatives.py", "backend=hf", f"model.path={model_dir}", f"data.input={prompts}",
               "data.format.id_field=id", f"output.dir={out}", "sampling.n=2", "sampling.max_new_tokens=8",
               "hf.num_threads=1", "shard.index=null")  # null: every shard here, then the merge
    negatives = read_rows(out / "negatives.parquet")
    validate_dft_rows(negatives, "negatives.parquet", min_negatives=2)
    assert [row["id"] for row in negatives] == [row["id"] for row in rows]
    for row in negatives:
        for k in range(2):
            content = row[f"generated_{k}"][-1]["content"]
            assert not any(token in content for token in CHATML_TOKENS), content

    results = tmp_path / "results.json"
    run_script("scripts/evaluate.py", "--model", str(model_dir), "--data", str(out / "negatives.parquet"),
               "--out", str(results), "backend=hf", "max_new_tokens=8", "num_threads=1", "extract=exact")
    report = json.loads(results.read_text())
    assert report["n"] == 4 and report["n_ranked"] == 4 and report["accuracy"] is not None
    assert report["rank_acc"] is not None and report["mean_pos_logp"] < 0
