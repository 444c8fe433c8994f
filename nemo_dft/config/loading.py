"""Loading typed OmegaConf configs: schema defaults, then a YAML file, then dotted overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid configuration; the message names the key (and the file, where there is one)."""


def load_structured(schema: type, config_file: str | Path | None, overrides: list[str] | None) -> DictConfig:
    """Merge ``config_file`` and ``key=value`` overrides over ``schema``'s defaults.

    Unknown keys and values of the wrong type are errors, reported with the file they came from.
    """
    cfg = OmegaConf.structured(schema)
    try:
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}: {err}") from err
    return cfg  # type: ignore[return-value]


def config_argument_parser(description: str, epilog: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The command line every config-driven script shares: ``[--config FILE] [--print-config]
    [--verbose] [key=value ...]``, with ``epilog`` (the main keys) kept as written."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file merged over the defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also print NeMo/Megatron/Lightning INFO messages and known-harmless library "
                             "warnings (they always go to <run.dir>/logs/console/rank0.log)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser
