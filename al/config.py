"""Typed configuration: dataclasses loaded from YAML plus dotted ``key=value`` CLI overrides.

Unknown keys and wrongly typed values fail at start with the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, TypeVar, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the message names the file, the key and what is allowed."""


def load_config(schema: type[T], path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> T:
    """Merge ``schema`` defaults <- YAML file <- ``overrides`` and return a ``schema`` instance."""
    source = "defaults"
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} not found")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            source = "command line"
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise ConfigError(f"overrides must look like key=value (dotted keys allowed); got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad config key {key!r}: {error.msg if hasattr(error, 'msg') else error}") from None


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, its ``value`` and what is ``allowed``."""
    if not condition:
        raise ConfigError(f"config key {key!r} = {value!r} is not allowed; expected {allowed}")


def cli_parser(description: str):
    """The scripts' common command line: ``--config FILE`` plus dotted ``key=value`` overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the keys of the script's config dataclass")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loop.cycles=3")
    return parser
