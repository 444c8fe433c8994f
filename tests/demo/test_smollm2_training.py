"""Training and export on the real pretrained model, SmolLM2-135M-Instruct (issue 24, part 3).

Each check compares against an independent computation:

- the token ids and loss mask of the data pipeline (``train_dft.py``'s datasets and collate
  functions, packed and padded) against transformers' own ``apply_chat_template`` on SmolLM2's
  ChatML template, with the project's documented rule (README, "Data format") computed here;
- two DFT steps (full fine-tuning, frozen reference) at PP = 2, two gloo processes with 15 layers
  each and the tied embedding/output weight split over the stages, against one process: losses,
  scores, gradient norms, the u table and every parameter;
- an HF PEFT adapter exported from a LoRA run (``convert_hf.py export --adapter``), loaded by
  ``peft`` on the HF base, against the NeMo checkpoint's own logits.

The NeMo import of SmolLM2 is the session fixture ``smollm2_nemo`` (tests/conftest.py), made once
and shared with tests/convert/test_convert_smollm2.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_child, script_command, subprocess_env

pytestmark = pytest.mark.slow

NEGATIVES = 2
MAX_LENGTH = 96
MAX_PROMPT_LENGTH = 64


def arithmetic_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows of nemo_dft/demo/arithmetic_task.py with two wrong answers as negatives: the worked answer
    with its last number off by one, and a bare ``The answer is: N+10``."""
    from nemo_dft.demo.arithmetic_task import make_splits

    rows = []
    for row in make_splits({"finetune": count}, seed)["finetune"]:
        question, answer = row["real"]
        head, number = answer["content"].rsplit(" ", 1)
        wrong = [f"{head} {int(number) + 1}", f"The answer is: {int(number) + 10}"]
        rows.append({**row, **{f"generated_{k}": [question, {"role": "assistant", "content": text}]
                               for k, text in enumerate(wrong)}})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def real_model_overrides(smollm2_dir: Path, nemo: Path, data: Path) -> list[str]:
    """scripts/real_demo.py's way of training SmolLM2, on a tiny batch: 2 prompts per step, one per micro-batch."""
    return [f"model.init_from={nemo}", "model.preset=checkpoint", "model.arch=llama", f"tokenizer.path={smollm2_dir}",
            f"data.path={data}", "data.eval_path=null", f"data.max_length={MAX_LENGTH}",
            f"data.max_prompt_length={MAX_PROMPT_LENGTH}", "data.num_epochs=1", f"dft.num_negatives={NEGATIVES}",
            "dft.reference=frozen", "model.micro_batch_size=1", "model.global_batch_size=2", "trainer.max_steps=2",
            "optim.warmup_ratio=0", "trainer.progress_bar=false", "log.tensorboard=false", "run.seed=0"]


def train(run_dir: Path, nproc: int, overrides: list[str]) -> Path:
    """``train_dft.py`` on ``nproc`` processes; the last checkpoint."""
    result = run_child(script_command("scripts/train_dft.py", f"run.dir={run_dir}", *overrides, nproc=nproc))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    [last] = sorted((run_dir / "checkpoints").glob("*-last"))
    return last


# ---------------------------------------------------------------- scored tokens under ChatML


def test_scored_tokens_are_the_chatml_response_and_its_end_of_turn(smollm2_dir: Path, tmp_path: Path) -> None:
    """The ids and loss mask train_dft.py feeds the model (padded and packed) for 3 arithmetic rows with 2
    negatives each, against transformers' apply_chat_template.  The rule (README, "Data format"): the
    response is the full chat's text after the prompt turns, so the assistant header is scored; with
    data.append_eos an EOS (here <|im_end|>) follows the template's own "<|im_end|>\\n"; no BOS is put
    before a prompt that starts with the BOS token (SmolLM2's BOS is <|im_start|>)."""
    from transformers import AutoTokenizer

    from nemo_dft.config.training import load_config
    from nemo_dft.data.datamodule import DFTDataModule
    from nemo_dft.modeling.tokenizer import load_tokenizer
    from nemo_dft.training.train import build_datasets, read_checked_rows

    rows = arithmetic_rows(3)
    data = write_rows(tmp_path / "rows.jsonl", rows)
    cfg = load_config(overrides=[f"tokenizer.path={smollm2_dir}", f"data.path={data}", "data.eval_path=null",
                                 f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
                                 "data.num_epochs=1", "data.shuffle=false", f"dft.num_negatives={NEGATIVES}",
                                 "model.arch=llama", "model.global_batch_size=3", "model.micro_batch_size=3"])
    assert cfg.data.append_eos and cfg.data.add_bos and cfg.tokenizer.chat_template is None  # the defaults
    tokenizer = load_tokenizer(cfg)
    train_ds, _ = build_datasets(cfg, tokenizer.tokenizer, read_checked_rows(cfg))
    groups = [train_ds[i] for i in range(3)]
    pad = tokenizer.tokenizer.pad_token_id
    assert [g["index"] for g in groups] == [0, 1, 2] and not any(g["truncated"] for g in groups)

    # independently: transformers' rendering and tokenization of the same chats
    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    assert (hf.eos_token_id, pad) == (eos, eos) and hf.bos_token_id == hf.convert_tokens_to_ids("<|im_start|>")
    end_of_turn = hf("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    expected: list[tuple[list[int], list[int]]] = []  # (whole sequence, its scored tokens) per row of the batch
    for row in rows:
        for column in ["real"] + [f"generated_{k}" for k in range(NEGATIVES)]:
            chat = row[column]
            context = hf.apply_chat_template(chat[:-1], tokenize=True)
            prompt = hf.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True)
            header = prompt[len(context):]
            assert prompt[:len(context)] == context and hf.decode(header) == "<|im_start|>assistant\n"
            answer = hf(chat[-1]["content"], add_special_tokens=False)["input_ids"]
            assert hf.apply_chat_template(chat, tokenize=True) == prompt + answer + end_of_turn
            sequence = prompt + answer + end_of_turn + [eos]  # data.append_eos: "\n" is not EOS
            scored = header + answer + end_of_turn + [eos]
            assert sequence[0] == hf.bos_token_id and sequence[1] != hf.bos_token_id  # the template's own, once
            assert hf.decode(scored) == f"<|im_start|>assistant\n{chat[-1]['content']}<|im_end|>\n<|im_end|>"
            expected.append((sequence, scored))

    def module(**layout) -> DFTDataModule:
        return DFTDataModule(train_ds, None, micro_batch_size=3, global_batch_size=3, pad_id=pad, **layout)

    # padded (data.packing=false): one row per sequence, inputs sequence[:-1], labels sequence[1:]
    batch = module(fixed_length=True).collate(groups)  # fixed_length: PP's padding to max_length - 1
    width = MAX_LENGTH - 1
    assert batch["tokens"].shape == (3 * (1 + NEGATIVES), width)
    for r, (sequence, scored) in enumerate(expected):
        n, prompt_length = len(sequence) - 1, len(sequence) - len(scored)
        assert batch["tokens"][r].tolist() == sequence[:-1] + [pad] * (width - n)
        assert batch["labels"][r].tolist() == sequence[1:] + [pad] * (width - n)
        mask = [0.0] * (prompt_length - 1) + [1.0] * len(scored) + [0.0] * (width - n)
        assert batch["loss_mask"][r].tolist() == mask, r
        assert batch["labels"][r][batch["loss_mask"][r].bool()].tolist() == scored
        assert batch["lengths"][r] == n
    assert batch["group_index"].tolist() == [g for g in range(3) for _ in range(1 + NEGATIVES)]

    # packed (data.packing=true, the demo's layout): the same sequences end to end in one row
    packed = module(fixed_length=False, packing=True).collate(groups)
    tokens = [t for sequence, _ in expected for t in sequence[:-1]]
    labels = [t for sequence, _ in expected for t in sequence[1:]]
    mask = [v for sequence, scored in expected
            for v in [0.0] * (len(sequence) - len(scored) - 1) + [1.0] * len(scored)]  # fmt: skip
    width = packed["tokens"].shape[1]
    assert width >= len(tokens) and width % 8 == 0
    assert packed["tokens"][0].tolist() == tokens + [pad] * (width - len(tokens))
    assert packed["labels"][0].tolist() == labels + [pad] * (width - len(tokens))
    assert packed["loss_mask"][0].tolist() == mask + [0.0] * (width - len(tokens))
    assert packed["labels"][0][packed["loss_mask"][0].bool()].tolist() == [t for _, s in expected for t in s]


# ---------------------------------------------------------------- PP = 2 against one process


def model_parameters(weights: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a distributed checkpoint as full tensors (the optimizer state left unread)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(weights))
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
             for name, meta in reader.read_metadata().state_dict_metadata.items()
             if name.startswith("module.") and isinstance(meta, TensorStorageMetadata)}  # fmt: skip
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.fixture(scope="module")
def pipeline_runs(smollm2_dir: Path, smollm2_nemo: dict, tmp_path_factory) -> dict:
    """Two steps of DFT with the frozen reference, full fine-tuning, on one process and at PP = 2.

    Adam's eps is 1e-4 as in tests/training/test_parallel_layouts.py: it divides each update by
    sqrt(v) + eps, so a weight whose gradient is ~1e-9 (a vocabulary row the batch never uses, through
    the tied output layer) would move by +-lr whatever the last bits of that gradient are."""
    root = tmp_path_factory.mktemp("smollm2_pp")
    data = write_rows(root / "train.jsonl", arithmetic_rows(4))
    overrides = [*real_model_overrides(smollm2_dir, smollm2_nemo["path"], data), "peft.scheme=null",
                 "optim.lr=1e-4", "optim.min_lr=1e-4", "optim.adam_eps=1e-4"]
    runs = {}
    for name, nproc, layout in (("pp1", 1, []), ("pp2", 2, ["trainer.devices=2",
                                                            "model.pipeline_model_parallel_size=2"])):
        last = train(root / name, nproc, [*overrides, *layout])
        runs[name] = {
            "metrics": [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()],
            "u": torch.load(last / "weights" / "common.pt", weights_only=False)["dft_u_table"]["values"],
            "params": model_parameters(last / "weights"),
            "config": (last / "context" / "model.yaml").read_text(),
        }
    runs["init"] = {"params": model_parameters(smollm2_nemo["path"] / "weights")}
    return runs


def test_two_dft_steps_at_pp2_equal_one_process(pipeline_runs: dict) -> None:
    """Per step: the loss within 1e-5 of the size of its terms (-pos + weight * neg: at step 1 the
    reference is the policy, so the loss is a difference of two scores ~20 times larger than itself),
    the scores and the gradient norm within 1e-5 of themselves; then the u table (to the tolerance
    tests/training/test_parallel_layouts.py derives from the scores') and every parameter, the tied
    embedding/output weight included, within 1e-6 + 1e-5 relative after two updates of ~1e-4."""
    from tests.training.test_parallel_layouts import reference_u_atol

    one, pp2 = pipeline_runs["pp1"], pipeline_runs["pp2"]
    assert [m["step"] for m in one["metrics"]] == [m["step"] for m in pp2["metrics"]] == [1, 2]
    u_atol = reference_u_atol(one["metrics"], 1.0, 1e-5)  # dft.tau is 1.0
    for ours, ref in zip(pp2["metrics"], one["metrics"], strict=True):
        scale = abs(ref["pos_logps"]) + ref["weight_mean"] * abs(ref["neg_logps"])
        assert abs(ours["loss"] - ref["loss"]) <= 1e-5 * scale, (ref["step"], ours["loss"], ref["loss"], scale)
        for key in ("pos_logps", "neg_logps", "grad_norm", "weight_mean"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ref["step"], key)
        assert abs(ours["u_mean"] - ref["u_mean"]) <= u_atol, (ref["step"], ours["u_mean"], ref["u_mean"])
    torch.testing.assert_close(pp2["u"], one["u"], rtol=1e-5, atol=u_atol)

    # the layouts: 15 layers per stage (PP = 2), one stage; the embedding and output weight shared
    assert "pipeline_model_parallel_size: 2" in pp2["config"] and "share_embeddings_and_output_weights: true" in \
        pp2["config"]  # fmt: skip
    params, init = one["params"], pipeline_runs["init"]["params"]
    assert sorted(pp2["params"]) == sorted(params) == sorted(init)
    assert "module.embedding.word_embeddings.weight" in params and not [k for k in params if "output_layer" in k]
    assert params["module.decoder.layers.mlp.linear_fc1.weight"].shape[0] == 30  # the layers' stacked tensors
    for name, value in params.items():
        change = (value - init[name]).abs().max().item()
        assert change > 1e-4, f"{name} moved by {change:.2e} only: the comparison below would say nothing"
        torch.testing.assert_close(pp2["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- the LoRA adapter under peft


@pytest.fixture(scope="module")
def lora_export(smollm2_dir: Path, smollm2_nemo: dict, tmp_path_factory) -> dict:
    """One LoRA-DFT step from the import (as scripts/real_demo.py trains: packed, adapter-free
    reference), then ``convert_hf.py export --adapter --base-model`` the HF directory."""
    root = tmp_path_factory.mktemp("smollm2_lora")
    data = write_rows(root / "train.jsonl", arithmetic_rows(2))
    last = train(root / "run", 1, [*real_model_overrides(smollm2_dir, smollm2_nemo["path"], data),
                                   "trainer.max_steps=1", "data.packing=true", "peft.scheme=lora", "peft.dim=8",
                                   "peft.alpha=16", "optim.lr=5e-2", "optim.min_lr=5e-2"])  # fmt: skip
    adapter = root / "adapter"
    command = script_command(REPO / "scripts" / "convert_hf.py", "export", "--nemo", str(last), "--out", str(adapter),
                             "--adapter", "--base-model", str(smollm2_dir))  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {"checkpoint": last, "adapter": adapter}


def test_lora_adapter_under_peft_gives_the_nemo_logits(smollm2_dir: Path, lora_export: dict) -> None:
    """peft's PeftModel.from_pretrained on the HF base, fp32, against the LoRA checkpoint's own NeMo
    logits within 1e-4 on a ChatML arithmetic chat and random tokens; the base alone is far from them."""
    from nemo.lightning import teardown
    from peft import PeftModel
    from transformers import AutoTokenizer

    from nemo_dft.convert.load import load_nemo_model
    from nemo_dft.convert.logits import compare_logits, hf_logits, load_hf_model, verification_inputs

    config = json.loads((lora_export["adapter"] / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str(smollm2_dir)

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chat = arithmetic_rows(3)[2]["real"]  # not one the step trained on
    inputs = [("arithmetic chat", torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True)])),
              *verification_inputs(tokenizer, 49152, prompts=(), random=1, seed=3)]
    with_adapter = PeftModel.from_pretrained(load_hf_model(smollm2_dir), str(lora_export["adapter"])).eval()
    model, trainer = load_nemo_model(lora_export["checkpoint"])
    try:
        comparison = compare_logits(with_adapter, model, inputs)
    finally:
        teardown(trainer, model)
    print(comparison.summary())
    assert comparison.max_abs_diff < 1e-4, comparison.summary()
    # the adapter matters: without it the logits are far from the LoRA model's
    with with_adapter.disable_adapter():
        base = hf_logits(with_adapter, inputs[0][1])
    assert (base - hf_logits(with_adapter, inputs[0][1])).abs().max().item() > 1e-2
