"""Turning chats into prompt/response token ids the way the paper's trainer does.

prompt   = chat_template(messages[:-1])            (no generation prompt)
response = chat_template(messages)[len(prompt):]   (starts with the assistant header)

Prompt and response ids concatenate to the ids of the full text; where the tokenizer merges
across the boundary, the prompt gives up its last token.  As in the paper's trainer (TRL 0.11
tokenization), a BOS is put before a prompt that does not start with one, and an EOS is appended
to every response whose last token is not EOS (with the zephyr template a response then ends
``</s>``, ``\n``, ``</s>``).

Truncation is decided per row, over the positive and every negative column the run will use (all
epochs' negatives), from the longest response L: a sequence whose prompt plus L exceeds
``max_length`` has its prompt cut to its last ``max_prompt_length`` tokens; if its prompt plus L
still exceeds ``max_length``, its response is cut to ``max_length - max_prompt_length``.  The same
cut sequences serve every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ChatTokenizer(Protocol):
    """The subset of an HF tokenizer that is used here."""

    bos_token_id: int | None
    eos_token_id: int | None

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


def tokenize_pair(
    tokenizer: ChatTokenizer, prompt: str, response: str, add_bos: bool, append_eos: bool = False
) -> TokenizedPair:
    """Token ids of prompt and response such that prompt + response == ids(prompt + response),
    then (when asked) a BOS before the prompt and an EOS after a response not ending in one."""
    full_ids = list(tokenizer(prompt + response, add_special_tokens=False)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    cut = len(prompt_ids)
    if full_ids[:cut] != prompt_ids:
        cut -= 1  # the boundary token merged with the response: the prompt loses its last token
    prompt_ids, response_ids = full_ids[:cut], full_ids[cut:]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos, *prompt_ids]
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids = [*response_ids, eos]
    return TokenizedPair(prompt_ids, response_ids)


@dataclass(frozen=True)
class TokenizedGroup:
    """Sequences that share one truncation decision (a row's positive and negatives)."""

    pairs: list[TokenizedPair]
    truncated: bool


def truncate_group(pairs: list[TokenizedPair], max_length: int, max_prompt_length: int) -> TokenizedGroup:
    """Apply the truncation rule of the module docstring to ``pairs`` with one longest response.

    A pair's prompt can be one token shorter than another's where the tokenizer merged the
    boundary, so each pair is checked with its own prompt against the shared longest response.
    """
    longest = max(len(p.response) for p in pairs)
    if all(len(p.prompt) + longest <= max_length for p in pairs):
        return TokenizedGroup(pairs, truncated=False)
    budget = max_length - max_prompt_length
    cut: list[TokenizedPair] = []
    for pair in pairs:
        prompt, response = pair.prompt, pair.response
        if len(prompt) + longest > max_length:
            prompt = prompt[-max_prompt_length:]
        if len(prompt) + longest > max_length:
            response = response[:budget]
        cut.append(TokenizedPair(prompt, response))
    return TokenizedGroup(cut, truncated=True)
