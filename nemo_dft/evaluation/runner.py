"""One evaluation: load the tokenizer (with the training template), generate, score, summarize."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_dft.config.loading import ConfigError
from nemo_dft.evaluation.examples import EvalExample


@dataclass
class EvalResult:
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def load_tokenizer(model_dir: Path, cfg: Any) -> Any:
    """The HF tokenizer with the chat template that training used (``chat_template`` as
    ``tokenizer.chat_template`` in training)."""
    from transformers import AutoTokenizer

    from nemo_dft.data.chat_template import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer or model_dir))
    try:
        tokenizer.chat_template = resolve_chat_template(cfg.chat_template, getattr(tokenizer, "chat_template", None))
    except ValueError as err:
        raise ConfigError(str(err).replace("tokenizer.chat_template", "chat_template")) from err
    return tokenizer


def _device(setting: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting


def evaluate(model_dir: Path, examples: list[EvalExample], cfg: Any, backend: str | None) -> EvalResult:
    from transformers import AutoModelForCausalLM

    from nemo_dft.evaluation.extraction import extract, is_correct
    from nemo_dft.evaluation.generation import answer_text, hf_greedy, prompt_ids, vllm_greedy
    from nemo_dft.evaluation.report import summarize
    from nemo_dft.evaluation.scoring import TokenRules, score_examples

    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    tokenizer = load_tokenizer(model_dir, cfg)
    device = _device(cfg.device)
    predictions: list[str] | None = None
    model = None
    if backend is not None:
        prompts = [prompt_ids(tokenizer, e, cfg.add_bos) for e in examples]
        if backend == "vllm":
            generated = vllm_greedy(str(model_dir), prompts, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                                    batch_size=cfg.batch_size)
        else:
            model = _load_model(AutoModelForCausalLM, model_dir, cfg.dtype, device)
            generated = hf_greedy(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.batch_size, device=device, progress=cfg.progress)
        predictions = [answer_text(tokenizer, e, g) for e, g in zip(examples, generated, strict=True)]
    scores = None
    if cfg.score:
        model = model or _load_model(AutoModelForCausalLM, model_dir, cfg.dtype, device)
        rules = TokenRules(cfg.add_bos, cfg.append_eos, cfg.max_length, cfg.max_prompt_length)
        scores = score_examples(model, tokenizer, examples, rules, device=device, batch_size=cfg.batch_size,
                                progress=cfg.progress)
    correct = None if predictions is None else [
        is_correct(p, e.reference, cfg.extract) for p, e in zip(predictions, examples, strict=True)]
    extracted = None if predictions is None else [extract(p, cfg.extract) is not None for p in predictions]
    records = []
    for i, example in enumerate(examples):
        record: dict[str, Any] = {"id": example.id}
        if predictions is not None:
            record.update(prediction=predictions[i], correct=correct[i])
        if scores is not None:
            s = scores[i]
            record.update(pos_logp=s.pos_logp, pos_tokens=s.pos_tokens, neg_logps=s.neg_logps,
                          neg_tokens=s.neg_tokens)
        records.append(record)
    return EvalResult(summarize(scores, correct, extracted), records)


def _load_model(model_cls: Any, model_dir: Path, dtype: str, device: str) -> Any:
    return model_cls.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
