"""The run's tokenizer: NeMo's wrapper around the HF tokenizer, with the configured chat template."""

from __future__ import annotations

from omegaconf import DictConfig

from nemo_dft.config.loading import ConfigError


def apply_chat_template_setting(cfg: DictConfig, hf_tokenizer) -> None:
    """Give the tokenizer the template that ``tokenizer.chat_template`` selects."""
    from nemo_dft.data.chat_template import resolve_chat_template

    try:
        hf_tokenizer.chat_template = resolve_chat_template(
            cfg.tokenizer.chat_template, getattr(hf_tokenizer, "chat_template", None)
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_tokenizer(cfg: DictConfig):
    """NeMo's wrapper around the HF tokenizer of ``tokenizer.path``, with the run's chat template."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    tokenizer = AutoTokenizer(str(cfg.tokenizer.path or tiny_tokenizer_dir()), use_fast=True)
    apply_chat_template_setting(cfg, tokenizer.tokenizer)
    return tokenizer
