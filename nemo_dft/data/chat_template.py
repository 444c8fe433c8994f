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
