"""Chat templates used to render training prompts and responses."""

from __future__ import annotations

# The zephyr-style template of the paper recipes (dft-algorithm.md, "Prompt template used in
# training").  HF renders it with trim_blocks/lstrip_blocks, so a user/assistant chat becomes
# "<|user|>\n{q}</s>\n<|assistant|>\n{a}</s>\n".
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# The MetaMath recipe's Alpaca prompt (dft-algorithm.md, "Generating negatives"): no chat roles,
# the answer follows "### Response:" and ends with the eos token.
ALPACA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

NAMED_CHAT_TEMPLATES = {"zephyr": ZEPHYR_CHAT_TEMPLATE, "alpaca": ALPACA_CHAT_TEMPLATE}


def resolve_chat_template(setting: str | None, tokenizer_template: str | None) -> str:
    """The Jinja template training renders with: a named one, a literal one, or the tokenizer's own.

    Raises ValueError (naming ``tokenizer.chat_template``) when none is available.
    """
    if setting is None:
        if not tokenizer_template:
            raise ValueError(
                "tokenizer.chat_template: the tokenizer has no chat template; set one of "
                f"{sorted(NAMED_CHAT_TEMPLATES)} or a Jinja template string"
            )
        return tokenizer_template
    if setting in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[setting]
    if "{%" not in setting and "{{" not in setting:
        raise ValueError(
            f"tokenizer.chat_template: {setting!r} is neither a known template name "
            f"({sorted(NAMED_CHAT_TEMPLATES)}) nor a Jinja template"
        )
    return setting


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be an HF tokenizer directory, or None; read from the files alone, so
    that a wrong ``tokenizer.path`` is reported before any library loads it."""
    from pathlib import Path

    directory = Path(path)
    if not directory.is_dir():
        return f"{path} is not a directory"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"{path} holds none of {', '.join(TOKENIZER_FILES)}: not an HF tokenizer directory"
    return None


def stored_chat_template(path: str) -> str | None:
    """The chat template an HF tokenizer directory carries (``chat_template.jinja`` or the
    ``chat_template`` of ``tokenizer_config.json``), without loading the tokenizer."""
    import json
    from pathlib import Path

    directory = Path(path)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, UnicodeDecodeError):
        return None  # the tokenizer library reports a damaged file itself, naming it
    return template if isinstance(template, str) else ("list" if template else None)
