"""Prompt building for both styles against the spec's literal strings."""

from __future__ import annotations

import pytest
from generation_testutils import REPO

from nemo_dft.data.io import DataFormatError
from nemo_dft.generation.config import ALPACA_TEMPLATE, DEFAULT_SYSTEM_MESSAGE, load_config
from nemo_dft.generation.fields import Example
from nemo_dft.generation.prompts import encode_prompt, render_prompt

QUESTION = "What is 2 + 3?"
ANSWER = "5"


def _example(*prompt: tuple[str, str]) -> Example:
    chat = [{"role": r, "content": c} for r, c in prompt] + [{"role": "assistant", "content": ANSWER}]
    return Example(id=0, real=chat)


def test_spec_constants_are_the_papers() -> None:
    assert DEFAULT_SYSTEM_MESSAGE == "You are an unhelpful assistant."
    assert ALPACA_TEMPLATE == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{query}\n\n### Response:"
    )


def test_chat_style_renders_system_user_and_generation_prompt(tiny_tokenizer) -> None:
    cfg = load_config(None, [])
    text = render_prompt(_example(("user", QUESTION)), cfg.prompt, tiny_tokenizer)
    assert text == (
        "<|system|>\nYou are an unhelpful assistant.</s>\n<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\n"
    )


def test_chat_style_replaces_the_datas_system_turn_and_keeps_it_without_one(tiny_tokenizer) -> None:
    example = _example(("system", "Be brief."), ("user", QUESTION))
    replaced = render_prompt(example, load_config(None, []).prompt, tiny_tokenizer)
    assert replaced.startswith("<|system|>\nYou are an unhelpful assistant.</s>\n<|user|>")
    assert "Be brief." not in replaced
    kept = render_prompt(example, load_config(None, ["prompt.system_message=null"]).prompt, tiny_tokenizer)
    assert kept == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\n"
    plain = render_prompt(
        _example(("user", QUESTION)), load_config(None, ["prompt.system_message=null"]).prompt, tiny_tokenizer
    )
    assert plain == "<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\n"


def test_template_style_is_the_alpaca_prompt(tiny_tokenizer) -> None:
    cfg = load_config(REPO / "conf/generate_negatives_metamath.yaml", [])
    query = "Solve {x}: x + 1 = 3"
    text = render_prompt(_example(("user", query)), cfg.prompt, tiny_tokenizer)
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSolve {x}: x + 1 = 3\n\n### Response:"
    )
    latex = load_config(
        None, ["prompt.style=template", "prompt.template='Put the answer in \\boxed{}. {query}'"]
    )
    assert render_prompt(_example(("user", query)), latex.prompt, tiny_tokenizer) == (
        "Put the answer in \\boxed{}. Solve {x}: x + 1 = 3"
    )


def test_template_style_rejects_multi_turn_prompts(tiny_tokenizer) -> None:
    cfg = load_config(None, ["prompt.style=template"])
    example = _example(("user", "a"), ("assistant", "b"), ("user", "c"))
    with pytest.raises(DataFormatError, match="single-turn"):
        render_prompt(example, cfg.prompt, tiny_tokenizer)


def test_encode_prompt_puts_bos_first_as_training_does_without_doubling_it(tiny_tokenizer) -> None:
    """Same ids as training's tokenization of the prompt, whether or not the tokenizer adds BOS."""
    from tokenizers import processors

    from nemo_dft.data.tokenize import tokenize_pair

    text = "<|user|>\nhi</s>\n<|assistant|>\n"
    plain = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer(text)["input_ids"] == plain  # the tiny tokenizer adds no BOS by itself
    assert encode_prompt(text, tiny_tokenizer) == [tiny_tokenizer.bos_token_id, *plain]
    assert encode_prompt(text, tiny_tokenizer, add_bos=False) == plain
    for add_bos in (True, False):
        training_prompt = tokenize_pair(tiny_tokenizer, text, "x", add_bos=add_bos).prompt
        assert encode_prompt(text, tiny_tokenizer, add_bos=add_bos) == training_prompt
    bos_adding = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    bos_id = bos_adding.bos_token_id
    bos_adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_id)]
    )
    plain_ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encode_prompt(text, bos_adding) == [bos_id, *plain_ids]
    assert encode_prompt("<s>" + text, bos_adding) == [bos_id, *plain_ids]


@pytest.fixture(scope="module")
def templateless_tokenizer(tiny_tokenizer):
    """The tiny tokenizer as a base model ships it (Mistral-7B-v0.1): no chat template."""
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    return tokenizer


def test_chat_style_falls_back_to_the_zephyr_prompt_without_a_chat_template(templateless_tokenizer) -> None:
    from nemo_dft.generation.prompts import chat_template

    cfg = load_config(None, [])
    assert cfg.prompt.fallback_template == "zephyr"
    text = render_prompt(_example(("user", QUESTION)), cfg.prompt, templateless_tokenizer)
    assert text == (
        "<|system|>\nYou are an unhelpful assistant.</s>\n<|user|>\nWhat is 2 + 3?</s>\n<|assistant|>\n"
    )
    assert chat_template(cfg.prompt, templateless_tokenizer)[1] is True
    alpaca = load_config(None, ["prompt.fallback_template=alpaca"]).prompt
    assert render_prompt(_example(("user", QUESTION)), alpaca, templateless_tokenizer) == (
        ALPACA_TEMPLATE.replace("{query}", QUESTION)
    )
    jinja = load_config(None, ["prompt.fallback_template='{% for m in messages %}[{{ m.content }}]{% endfor %}'"])
    assert render_prompt(_example(("user", QUESTION)), jinja.prompt, templateless_tokenizer) == (
        "[You are an unhelpful assistant.][What is 2 + 3?]"
    )
    with pytest.raises(DataFormatError, match="no chat template and prompt.fallback_template is null"):
        render_prompt(_example(("user", QUESTION)), load_config(None, ["prompt.fallback_template=null"]).prompt,
                      templateless_tokenizer)


def test_the_tokenizers_own_template_wins_over_the_fallback(tiny_tokenizer) -> None:
    from nemo_dft.generation.prompts import chat_template

    prompt = load_config(None, ["prompt.fallback_template=alpaca"]).prompt
    assert chat_template(prompt, tiny_tokenizer) == (tiny_tokenizer.chat_template, False)
    assert render_prompt(_example(("user", QUESTION)), prompt, tiny_tokenizer).startswith("<|system|>\n")
