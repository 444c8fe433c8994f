"""Command-line handling shared by scripts/generate_negatives.py and scripts/merge_negatives.py."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_dft.config.loading import config_argument_parser
from nemo_dft.data.io import DataFormatError
from nemo_dft.generation.config import ConfigError, GenerationConfig, load_config
from nemo_dft.generation.merge import MergeError
from nemo_dft.generation.runner import GenerationError


def _flat_defaults(node: Any, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _flat_defaults(value, f"{prefix}{key}.")
        else:
            yield f"  {prefix}{key}={value!r}"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    defaults = "\n".join(_flat_defaults(OmegaConf.structured(GenerationConfig)))
    epilog = f"keys and defaults (see conf/generate_negatives.yaml and docs/generation.md):\n{defaults}"
    return config_argument_parser(description, epilog, prog=prog)


def main(
    prog: str, description: str, action: Callable[[DictConfig], None], argv: list[str] | None = None
) -> int:
    """Parse, load the config, run ``action``; expected errors print one line and exit 2."""
    args = build_parser(prog, description).parse_args(argv)
    if not args.verbose:  # vLLM's INFO lines (about 80 per run) only with --verbose
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        action(cfg)
    except (ConfigError, DataFormatError, GenerationError, MergeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
