"""Data: template rendering, prompt masking, truncation, per-epoch negatives, row errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from nemo_dft.data.collate import collate_groups
from nemo_dft.data.dataset import DFTGroupDataset, GroupSettings
from nemo_dft.data.io import DataFormatError, read_rows, write_parquet_atomic
from nemo_dft.data.rows import RowError, validate_dft_rows
from nemo_dft.data.tokenize import TokenizedPair, render, tokenize_pair, truncate_group
from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

from .paper_rule import paper_trainer_row


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def make_row(i: int, k: int = 4) -> dict:
    row = {"id": f"ex{i}", "real": chat(f"Repeat: q {i}", "right answer")}
    for j in range(k):
        row[f"generated_{j}"] = chat(f"Repeat: q {i}", f"wrong {j} of {i}")
    return row


def test_template_renders_the_spec_strings(tokenizer):
    prompt, response = render(tokenizer, chat("What is 2+2?", "4"))
    assert prompt == "<|user|>\nWhat is 2+2?</s>\n"
    assert response == "<|assistant|>\n4</s>\n"
    generation = tokenizer.apply_chat_template(chat("Hi", "x")[:1], tokenize=False, add_generation_prompt=True)
    assert generation == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_prompt_and_response_ids_concatenate_to_the_full_text(tokenizer):
    for question, answer in [("Repeat: a b", "a b"), ("Reverse: x y z", "z y x"), ("q", "")]:
        prompt, response = render(tokenizer, chat(question, answer))
        pair = tokenize_pair(tokenizer, prompt, response, add_bos=False)
        full = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert pair.prompt + pair.response == full
        assert tokenizer.decode(pair.response).endswith("</s>\n")


def test_boundary_merge_moves_the_last_prompt_token_to_the_response():
    class MergingTokenizer:
        """'ab' is one token, so prompt 'a' + response 'b' do not split at the text boundary."""

        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            ids, i = [], 0
            while i < len(text):
                if text[i : i + 2] == "ab":
                    ids.append(100)
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            return {"input_ids": ids}

    pair = tokenize_pair(MergingTokenizer(), "xa", "bc", add_bos=True)
    assert pair.prompt == [1, ord("x")]
    assert pair.response == [100, ord("c")]


def test_truncation_keeps_prompt_end_then_cuts_responses():
    prompt = list(range(10))
    short = TokenizedPair(prompt, [50, 51])
    assert truncate_group([short], max_length=12, max_prompt_length=4).pairs == [short]
    long_group = [TokenizedPair(prompt, [50, 51, 52]), TokenizedPair(prompt, list(range(60, 70)))]
    group = truncate_group(long_group, max_length=12, max_prompt_length=4)
    assert group.truncated
    assert all(p.prompt == [6, 7, 8, 9] for p in group.pairs)  # keep_end
    assert group.pairs[0].response == [50, 51, 52]
    assert group.pairs[1].response == list(range(60, 68))  # max_length - max_prompt_length
    assert max(len(p.prompt) + len(p.response) for p in group.pairs) <= 12
    only_prompt = truncate_group([TokenizedPair(prompt, [1, 2])], max_length=8, max_prompt_length=6)
    assert only_prompt.pairs[0].prompt == prompt[-6:] and only_prompt.pairs[0].response == [1, 2]


def test_collate_masks_prompt_tokens_and_keeps_groups_together(tokenizer):
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, shuffle=False)
    dataset = DFTGroupDataset([make_row(i) for i in range(3)], tokenizer, settings, "rows")
    items = [dataset[0], dataset[1]]
    batch = collate_groups(items, pad_id=0)
    assert batch["tokens"].shape[0] == 6 and batch["tokens"].shape[1] % 8 == 0
    assert batch["group_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["example_index"].tolist() == [0, 1]
    for row, pair in enumerate(p for item in items for p in item["pairs"]):
        seq = pair.prompt + pair.response
        n = len(seq) - 1
        assert batch["tokens"][row, :n].tolist() == seq[:-1]
        assert batch["labels"][row, :n].tolist() == seq[1:]
        masked_labels = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        assert masked_labels == pair.response  # exactly the response tokens are scored
        assert batch["lengths"][row] == n
    fixed = collate_groups(items, pad_id=0, pad_to=63)
    assert fixed["tokens"].shape[1] == 63


def test_per_epoch_negative_blocks(tokenizer):
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2, shuffle=True)
    rows = [make_row(i) for i in range(5)]
    dataset = DFTGroupDataset(rows, tokenizer, settings, "rows")
    assert len(dataset) == 10
    seen_per_epoch = {0: set(), 1: set()}
    for item in range(len(dataset)):
        group = dataset[item]
        epoch, index = group["epoch"], group["index"]
        seen_per_epoch[epoch].add(index)
        texts = [tokenizer.decode(p.response) for p in group["pairs"]]
        assert "right answer" in texts[0]
        assert [f"wrong {epoch * 2 + j} of {index}" in t for j, t in enumerate(texts[1:])] == [True, True]
    assert seen_per_epoch == {0: set(range(5)), 1: set(range(5))}  # each epoch covers every example once
    fixed = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2,
                          per_epoch_negatives=False)
    assert fixed.negative_columns(1) == [0, 1]


def test_too_few_negatives_names_the_example(tokenizer):
    rows = [make_row(0), make_row(1, k=3)]
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2)
    with pytest.raises(RowError, match=r"row 1 \(id='ex1'\), column 'generated_3': missing"):
        DFTGroupDataset(rows, tokenizer, settings, "train.jsonl")


@pytest.mark.parametrize(
    ("mutate", "column", "reason"),
    [
        (lambda r: r.pop("real"), "real", "non-empty list"),
        (lambda r: r["real"][-1].update(role="user"), "real", "role 'assistant'"),
        (lambda r: r["generated_1"][0].update(content="other"), "generated_1", "prompt differs"),
        (lambda r: r["generated_0"].__setitem__(0, "text"), "generated_0", "not a dict"),
        (lambda r: r.update(id="ex0"), "id", "duplicate id"),
    ],
)
def test_bad_rows_are_reported_with_index_and_column(mutate, column, reason):
    rows = [make_row(i) for i in range(4)]
    mutate(rows[2])
    with pytest.raises(RowError, match=rf"data.jsonl: row 2 .*column '{column}': .*{reason}"):
        validate_dft_rows(rows, "data.jsonl", min_negatives=2)


def test_readers_agree_across_formats(tmp_path):
    rows = [make_row(i) for i in range(3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_parquet_atomic(rows, tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for path in (jsonl, tmp_path / "d.parquet", tmp_path / "hf"):
        assert read_rows(path) == rows, path
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: column \d+: invalid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataFormatError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_embedded_task_is_valid(tokenizer):
    from nemo_dft.demo.tiny_task import ASSET_DIR

    for split in ("train.jsonl", "heldout.jsonl"):
        rows = read_rows(ASSET_DIR / split)
        validate_dft_rows(rows, split, min_negatives=4)
        assert all(r["real"][-1]["content"] != r[f"generated_{k}"][-1]["content"] for r in rows for k in range(4))
    assert torch.is_tensor(collate_groups([DFTGroupDataset(
        rows, tokenizer, GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32), split)[0]],
        pad_id=0)["tokens"])


# ---- the paper trainer's tokenization (appended EOS, truncation over every epoch's negatives) ----


def scored_tokens(dataset, item):
    """The response tokens the loss scores for each sequence of group ``item``, via the collate."""
    batch = collate_groups([dataset[item]], pad_id=0)
    return [labels[mask.bool()].tolist() for labels, mask in zip(batch["labels"], batch["loss_mask"], strict=True)]


def test_every_scored_response_ends_with_the_eos_of_the_paper_rule(tokenizer):
    rows = [make_row(i) for i in range(4)]
    rows[3]["generated_1"][-1]["content"] = ""  # an empty negative is kept (data.empty_answers=keep) and scored
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, num_epochs=2, shuffle=False,
                             allow_empty_answers=True)
    dataset = DFTGroupDataset(rows, tokenizer, settings, "rows")
    eos = tokenizer.eos_token_id
    for item in range(len(dataset)):
        epoch, index = dataset.locate(item)
        columns = ["real", *(f"generated_{k}" for k in settings.negative_columns(epoch))]
        expected = paper_trainer_row(tokenizer, rows[index], ["real", *(f"generated_{k}" for k in range(4))], 64, 32)
        expected = dict(zip(["real", *(f"generated_{k}" for k in range(4))], expected, strict=True))
        for column, scored, pair in zip(columns, scored_tokens(dataset, item), dataset[item]["pairs"], strict=True):
            assert (pair.prompt, pair.response) == expected[column], (item, column)
            assert scored == expected[column][1]
            # the zephyr turn ends "</s>\n"; the appended EOS follows it and is scored
            assert scored[-3:] == [eos, tokenizer("\n", add_special_tokens=False)["input_ids"][0], eos]
    off = DFTGroupDataset(rows, tokenizer, dataclasses.replace(settings, append_eos=False), "rows")
    for item in range(len(off)):
        epoch, index = off.locate(item)
        columns = ["real", *(f"generated_{k}" for k in settings.negative_columns(epoch))]
        unappended = paper_trainer_row(tokenizer, rows[index], columns, 64, 32, append_eos=False)
        assert [(p.prompt, p.response) for p in off[item]["pairs"]] == unappended
        assert all(tokenizer.decode(p.response).endswith("</s>\n") for p in off[item]["pairs"])


def test_a_response_already_ending_in_eos_gets_no_second_one(tokenizer):
    from nemo_dft.data.chat_template import ALPACA_CHAT_TEMPLATE

    alpaca = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    alpaca.chat_template = ALPACA_CHAT_TEMPLATE  # " answer</s>": the template's own EOS ends it
    rows = [make_row(i, k=2) for i in range(2)]
    dataset = DFTGroupDataset(rows, alpaca, GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32), "rows")
    for item in range(len(dataset)):
        index = dataset.locate(item)[1]
        expected = paper_trainer_row(alpaca, rows[index], ["real", "generated_0", "generated_1"], 64, 32)
        assert [(p.prompt, p.response) for p in dataset[item]["pairs"]] == expected
        for pair in dataset[item]["pairs"]:
            assert pair.response[-1] == alpaca.eos_token_id and pair.response[-2] != alpaca.eos_token_id


def long_later_negative_rows(tokenizer):
    """Row 0 short everywhere; row 1 long only in generated_1 (epoch 1's negative with m=1); row 2
    long only in its positive."""
    rows = [make_row(i, k=2) for i in range(3)]
    long_answer = " ".join("abcdefgh"[i % 8] for i in range(40))
    rows[1]["generated_1"][-1]["content"] = long_answer
    rows[2]["real"][-1]["content"] = long_answer
    return rows


def test_truncation_is_decided_over_every_epochs_negatives(tokenizer):
    rows = long_later_negative_rows(tokenizer)
    max_length, max_prompt_length = 40, 8
    settings = GroupSettings(num_negatives=1, max_length=max_length, max_prompt_length=max_prompt_length,
                             num_epochs=2, shuffle=False)
    dataset = DFTGroupDataset(rows, tokenizer, settings, "rows")
    columns = ["real", "generated_0", "generated_1"]
    whole = {i: paper_trainer_row(tokenizer, rows[i], columns, 10**6, 1) for i in range(3)}  # untruncated
    # preconditions: row 1's epoch-0 group alone would fit; its epoch-1 negative does not
    assert max(len(p) + len(r) for p, r in whole[1][:2]) <= max_length
    assert len(whole[1][2][0]) + len(whole[1][2][1]) > max_length
    assert len(whole[1][0][0]) > max_prompt_length
    for item in range(len(dataset)):
        epoch, index = dataset.locate(item)
        group = dataset[item]
        expected = paper_trainer_row(tokenizer, rows[index], columns, max_length, max_prompt_length)
        used = [expected[0], expected[1 + epoch]]
        assert [(p.prompt, p.response) for p in group["pairs"]] == used, (epoch, index)
        assert group["truncated"] == (index != 0)
        if index == 1:  # cut in epoch 0 as well, although epoch 0's own negative is short
            assert all(len(p.prompt) == max_prompt_length for p in group["pairs"])
            assert group["pairs"][0].response == whole[1][0][1]  # the short positive keeps its tokens
        if index == 0:
            assert [(p.prompt, p.response) for p in group["pairs"]] == [whole[0][0], whole[0][1 + epoch]]
    assert dataset.num_truncated == 2 * 2  # rows 1 and 2, in both epochs
    # without per-epoch negatives the run never uses generated_1: row 1 stays whole
    fixed = DFTGroupDataset(rows, tokenizer, dataclasses.replace(settings, per_epoch_negatives=False), "rows")
    assert [(p.prompt, p.response) for p in fixed[1]["pairs"]] == whole[1][:2] and not fixed[1]["truncated"]


def test_sharegpt_rows_with_a_system_column_read_like_role_content_rows(tokenizer):
    plain = [make_row(i, k=2) for i in range(3)]
    sharegpt = []
    for row in plain:
        converted = {"id": row["id"], "system": "Think step by step."}
        for column in ("real", "generated_0", "generated_1"):
            converted[column] = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                 for m in row[column]]
        sharegpt.append(converted)
    settings = GroupSettings(num_negatives=2, max_length=64, max_prompt_length=32, shuffle=False)
    ours = DFTGroupDataset(sharegpt, tokenizer, settings, "sharegpt.jsonl")
    with_system = [{k: ([{"role": "system", "content": "Think step by step."}, *v] if k != "id" else v)
                    for k, v in row.items()} for row in plain]
    reference = DFTGroupDataset(with_system, tokenizer, settings, "plain.jsonl")
    for item in range(len(ours)):
        assert ours[item]["pairs"] == reference[item]["pairs"]
    assert tokenizer.decode(ours[0]["pairs"][0].prompt).startswith("<s><|system|>\nThink step by step.</s>")
    sharegpt[1]["generated_0"][1]["from"] = "bot"
    with pytest.raises(RowError, match=r"sharegpt.jsonl: row 1 \(id='ex1'\), column 'generated_0': message 1: "
                                       r"unknown ShareGPT speaker 'bot'"):
        DFTGroupDataset(sharegpt, tokenizer, settings, "sharegpt.jsonl")


def test_empty_answers_are_refused_or_dropped_and_counted():
    from nemo_dft.data.rows import RowError, drop_empty_answers, validate_dft_rows
    from nemo_dft.demo.tiny_task import ASSET_DIR

    rows = [json.loads(line) for line in (ASSET_DIR / "train.jsonl").read_text().splitlines()[:5]]
    rows[1]["real"][-1]["content"] = ""
    rows[3]["generated_1"][-1]["content"] = " \n"
    rows[4]["generated_3"][-1]["content"] = ""  # a column this run does not use
    with pytest.raises(RowError, match=r"row 1 .*column 'real': the answer is empty"):
        validate_dft_rows(rows, "t.jsonl", 2)
    kept, dropped = drop_empty_answers(rows, 2)
    assert dropped == [rows[1]["id"], rows[3]["id"]] and len(kept) == 3
    validate_dft_rows(kept, "t.jsonl", 2)
