"""Typed configuration: dataclasses loaded from YAML plus dotted ``key=value`` CLI overrides.

Unknown keys and wrongly typed values fail at start with the key, the value and what is allowed.

A ``base:`` key in any block of a YAML file names a file (or a list of files), relative to that
YAML file, whose keys are merged beneath the block: settings shared by several configs (a dataset,
a model's sampling settings) are written once, in configs/base/. Order: schema defaults < bases
(in list order, each with its own bases) < the file < command-line overrides.
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
            merged = OmegaConf.merge(merged, read_yaml(Path(path)))
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


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """``path``'s keys with the files its ``base:`` keys name merged beneath them (``chain``: the
    files that include ``path``, to refuse cycles)."""
    if path.resolve() in [included.resolve() for included in chain]:
        raise ConfigError("config files include each other as base: " + " -> ".join(map(str, (*chain, path))))
    if not path.is_file():
        raise ConfigError(f"{chain[-1]}: base file {path} not found" if chain else f"config file {path} not found")
    # plain containers, interpolations unresolved: they resolve once, in the structured merge
    return _merge_bases(OmegaConf.to_container(OmegaConf.load(path)), path, (*chain, path))


def _merge_bases(node, path: Path, chain: tuple[Path, ...]):
    if not isinstance(node, dict):
        return node
    names = node.pop("base", None) or []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths (relative to {path.parent}), got {names!r}")
    node = {key: _merge_bases(value, path, chain) for key, value in node.items()}
    bases = [read_yaml(path.parent / name, chain) for name in names]
    return OmegaConf.to_container(OmegaConf.merge(*bases, node)) if bases else node


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
