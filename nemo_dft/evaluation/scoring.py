"""Log-probabilities of answers under an HF causal LM, tokenized exactly as training tokenizes
them (``nemo_dft.data.tokenize``: the chat template's prompt/response split, BOS and EOS rules,
the per-row truncation), so that these numbers are the ones training's metrics report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from nemo_dft.data.tokenize import TokenizedPair, render, tokenize_pair, truncate_group
from nemo_dft.evaluation.examples import EvalExample
from nemo_dft.objective import length_average


@dataclass(frozen=True)
class TokenRules:
    add_bos: bool = True
    append_eos: bool = True
    max_length: int | None = None  # None: no truncation
    max_prompt_length: int | None = None


@dataclass
class ExampleScores:
    pos_logp: float
    pos_tokens: int
    neg_logps: list[float]
    neg_tokens: list[int]

    @property
    def has_negatives(self) -> bool:
        return bool(self.neg_logps)

    def ranked_correct(self, length_averaged: bool) -> bool:
        """The positive strictly above every negative (summed or length-averaged scores)."""
        pos = torch.tensor([self.pos_logp], dtype=torch.float64)
        neg = torch.tensor(self.neg_logps, dtype=torch.float64)
        if length_averaged:
            pos = length_average(pos, torch.tensor([self.pos_tokens]))
            neg = length_average(neg, torch.tensor(self.neg_tokens))
        return bool((pos > neg).all())


def tokenize_example(tokenizer: Any, example: EvalExample, rules: TokenRules) -> list[TokenizedPair]:
    """The positive's and each negative's (prompt ids, response ids), as training builds a group."""
    pairs = []
    for answer in [example.reference, *example.negatives]:
        prompt, response = render(tokenizer, example.chat(answer))
        pairs.append(tokenize_pair(tokenizer, prompt, response, rules.add_bos, rules.append_eos))
    if rules.max_length is not None:
        pairs = truncate_group(pairs, rules.max_length, rules.max_prompt_length or rules.max_length // 2).pairs
    return pairs


@torch.no_grad()
def sequence_logps(model: Any, pairs: list[TokenizedPair], device: str, pad_id: int) -> list[float]:
    """Summed log-probability of each pair's response given its prompt (one padded batch)."""
    width = max(len(p.prompt) + len(p.response) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    scored = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, pair in enumerate(pairs):
        full = pair.prompt + pair.response
        ids[row, : len(full)] = torch.tensor(full)
        mask[row, : len(full)] = 1
        scored[row, len(pair.prompt): len(full)] = True
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * scored[:, 1:]).sum(dim=-1).tolist()


def score_examples(model: Any, tokenizer: Any, examples: list[EvalExample], rules: TokenRules, *,
                   device: str, batch_size: int, progress: bool = True) -> list[ExampleScores]:
    """Scores of every example's positive and negatives, ``batch_size`` sequences per forward."""
    groups = [tokenize_example(tokenizer, e, rules) for e in examples]
    flat = [(g, j) for g, pairs in enumerate(groups) for j in range(len(pairs))]
    values: dict[tuple[int, int], float] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in tqdm(range(0, len(flat), batch_size), desc="scoring", unit="batch", disable=not progress):
        chunk = flat[start: start + batch_size]
        logps = sequence_logps(model, [groups[g][j] for g, j in chunk], device, pad_id)
        values.update(zip(chunk, logps, strict=True))
    scores = []
    for g, pairs in enumerate(groups):
        scores.append(ExampleScores(
            pos_logp=values[(g, 0)], pos_tokens=len(pairs[0].response),
            neg_logps=[values[(g, j)] for j in range(1, len(pairs))],
            neg_tokens=[len(p.response) for p in pairs[1:]],
        ))
    return scores
