"""Prompt building shared by both backends, so that vLLM and HF see identical token ids.

Styles (dft-algorithm.md, "Generating negatives"): ``chat`` renders the tokenizer's chat template
over [system message, prompt turns] with the generation prompt (a tokenizer without one, such as
Mistral-7B-v0.1's, gets ``prompt.fallback_template``: zephyr, as the paper's generator does);
``template`` substitutes the single user turn into a plain format string (the Alpaca prompt of the
MetaMath recipe).
"""

from __future__ import annotations

from typing import Any

from nemo_dft.data.chat_template import resolve_chat_template
from nemo_dft.data.io import DataFormatError
from nemo_dft.generation.fields import Example, Message


def chat_prompt_messages(example: Example, system_message: str | None) -> list[Message]:
    """The prompt turns, led by ``system_message``; it replaces any system turn of the data (the
    paper's generation prompt carries its own), and without one the data's turns are kept as is."""
    if not system_message:
        return list(example.prompt)
    turns = [m for m in example.prompt if m["role"] != "system"]
    return [{"role": "system", "content": system_message}, *turns]


def template_prompt(example: Example, template: str) -> str:
    """``template`` with ``{query}`` replaced by the one user turn (no str.format, so a template may
    hold other braces, e.g. LaTeX's \\boxed{})."""
    users = [m["content"] for m in example.prompt if m["role"] == "user"]
    if len(users) != 1 or len(example.prompt) - len(users) > 1 or example.prompt[-1]["role"] != "user":
        raise DataFormatError(
            f"example id={example.id!r}: prompt.style=template needs a single-turn prompt "
            f"(one user message, maybe after a system one), got roles {[m['role'] for m in example.prompt]}"
        )
    return template.replace("{query}", users[0])


def chat_template(prompt_cfg: Any, tokenizer: Any) -> tuple[str, bool]:
    """(the Jinja template chat prompts use, whether it is ``prompt.fallback_template``)."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, False
    if prompt_cfg.fallback_template is None:
        raise DataFormatError(
            "prompt.style=chat, but the tokenizer has no chat template and prompt.fallback_template is null; "
            "set it (zephyr, alpaca or a Jinja template) or use prompt.style=template"
        )
    return resolve_chat_template(prompt_cfg.fallback_template, None), True


def render_prompt(example: Example, prompt_cfg: Any, tokenizer: Any) -> str:
    """The prompt text of ``example`` under ``prompt_cfg`` (style, system_message, template,
    fallback_template)."""
    if prompt_cfg.style == "template":
        return template_prompt(example, prompt_cfg.template)
    template, _ = chat_template(prompt_cfg, tokenizer)
    messages = chat_prompt_messages(example, prompt_cfg.system_message)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=template
    )


def encode_prompt(text: str, tokenizer: Any, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt by training's rule (``nemo_dft.data.tokenize``): the text without the
    tokenizer's own special tokens, then BOS first when ``add_bos`` and the text does not already
    start with it (a template that renders BOS is not doubled).  A tokenizer that adds no BOS by
    itself would otherwise sample from a prefix training never shows the model."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids
