"""The paper trainer's tokenization, recomputed for tests from the HF tokenizer alone (no nemo_dft
code): TRL 0.11's prompt/answer split, BOS and appended EOS, and truncation decided over every
column of the row, as the shared reference dft-algorithm.md states the rule."""

from __future__ import annotations


def paper_trainer_row(tokenizer, row, columns, max_length, max_prompt_length, append_eos=True):
    """(prompt ids, response ids) per column as the paper's trainer (TRL 0.11 tokenization, the rule
    in the shared reference dft-algorithm.md) makes them, straight from the HF tokenizer."""
    pairs = []
    for column in columns:
        chat = row[column]
        prompt_text = tokenizer.apply_chat_template(chat[:-1], tokenize=False)
        full_text = tokenizer.apply_chat_template(chat, tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        start = len(prompt) if full[: len(prompt)] == prompt else len(prompt) - 1
        prompt, response = full[:start], full[start:]
        if not prompt or prompt[0] != tokenizer.bos_token_id:
            prompt = [tokenizer.bos_token_id, *prompt]
        if append_eos and (not response or response[-1] != tokenizer.eos_token_id):
            response = [*response, tokenizer.eos_token_id]
        pairs.append((prompt, response))
    longest = max(len(r) for _, r in pairs)
    prompts = [p[-max_prompt_length:] if len(p) + longest > max_length else p for p, _ in pairs]
    return [
        (p, r[: max_length - max_prompt_length] if len(p) + longest > max_length else r)
        for p, (_, r) in zip(prompts, pairs, strict=True)
    ]
