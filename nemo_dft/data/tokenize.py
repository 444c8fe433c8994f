"""Turning chats into prompt/response token ids the way the paper's trainer does.

prompt   = chat_template(messages[:-1])            (no generation prompt)
response = chat_template(messages)[len(prompt):]   (starts with the assistant header)

Prompt and response ids concatenate to the ids of the full text; where the tokenizer merges
across the boundary, the prompt gives up its last token.  Over-long groups are truncated: first
the prompt to ``max_prompt_length`` (keeping its end), then every response of the group to
``max_length - max_prompt_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ChatTokenizer(Protocol):
    """The subset of an HF tokenizer that is used here."""

    bos_token_id: int | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    response: list[int]


def render(tokenizer: ChatTokenizer, chat: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt text, response text) of a chat whose last message is the answer."""
    prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full chat")
    return prompt, full[len(prompt) :]


def tokenize_pair(tokenizer: ChatTokenizer, prompt: str, response: str, add_bos: bool) -> TokenizedPair:
    """Token ids of prompt and response such that prompt + response == ids(prompt + response)."""
    full_ids = list(tokenizer(prompt + response, add_special_tokens=False)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    cut = len(prompt_ids)
    if full_ids[:cut] != prompt_ids:
        cut -= 1  # the boundary token merged with the response: the prompt loses its last token
    prompt_ids, response_ids = full_ids[:cut], full_ids[cut:]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos, *prompt_ids]
    return TokenizedPair(prompt_ids, response_ids)


@dataclass(frozen=True)
class TokenizedGroup:
    """One prompt's sequences: the positive first, then its negatives."""

    pairs: list[TokenizedPair]
    truncated: bool


def truncate_group(pairs: list[TokenizedPair], max_length: int, max_prompt_length: int) -> TokenizedGroup:
    """Apply the spec's truncation rules to a whole group, so that its sequences stay comparable.

    A pair's prompt can be one token shorter than another's where the tokenizer merged the
    boundary, so the rules are applied pair by pair with the group-wide decision.
    """
    if max(len(p.prompt) + len(p.response) for p in pairs) <= max_length:
        return TokenizedGroup(pairs, truncated=False)
    pairs = [TokenizedPair(p.prompt[-max_prompt_length:], p.response) for p in pairs]
    if max(len(p.prompt) + len(p.response) for p in pairs) > max_length:
        budget = max_length - max_prompt_length
        pairs = [TokenizedPair(p.prompt, p.response[:budget]) for p in pairs]
    return TokenizedGroup(pairs, truncated=True)
