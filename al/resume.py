"""May earlier work in a folder be reused? One rule for every command that resumes.

Work records its *identity* beside it: the config fields that change its results, as plain
JSON. The same identity resumes (reuses the work); another identity is refused with a message
that names the differing keys, unless ``overwrite=true``: then the work is replaced (and a
replacement killed half-way resumes like any other run). A field added to a config after a
folder was written is compared at its default, so older folders keep resuming.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from al.config import ConfigError

_MISSING = object()


class ResumeConflictError(ConfigError):
    """A folder holds work made with another identity."""


def identity(values: Any, ignore: Iterable[str] = ()) -> dict:
    """``values`` (a dataclass or dict) as plain JSON (tuples become lists, as on disk), without
    the dotted ``ignore`` keys: the settings that do not change results (where output goes,
    progress bars, ``overwrite``)."""
    plain = json.loads(json.dumps(values, default=_plain))
    for dotted in ignore:
        *parents, leaf = dotted.split(".")
        node = plain
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        # a config that grew a field may record itself without it at its default
        # (al.data.config.DataConfig.as_record), so the identities recorded before still match
        return value.as_record() if hasattr(value, "as_record") else asdict(value)
    raise TypeError(f"{type(value).__name__} is not a config value")


def _with_defaults(recorded: dict, defaults: dict) -> dict:
    merged = dict(defaults)
    for key, value in recorded.items():
        merged[key] = _with_defaults(value, defaults[key]) if isinstance(value, dict) and isinstance(
            defaults.get(key), dict) else value
    return merged


def differing_keys(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities (nested dicts compared by key)."""
    keys = []
    for key in sorted({*recorded, *current}):
        old, new = recorded.get(key, _MISSING), current.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += differing_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


def _value(values: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        values = values.get(key, _MISSING) if isinstance(values, dict) else _MISSING
    return "(absent)" if values is _MISSING else values


def check_resume(recorded: Optional[dict], current: dict, where: Path, overwrite: bool = False,
                 defaults: Optional[dict] = None, remedy: str = "use another output_dir, or overwrite=true to replace it"
                 ) -> bool:
    """True when ``where`` holds work of ``current``'s identity: reuse it. False when it holds
    none, or work of another identity and ``overwrite`` is set: do the work (again). Raise
    :class:`ResumeConflictError` naming the differing keys and the ``remedy`` otherwise. ``defaults``: the identity of the
    config's defaults, filling fields the record predates."""
    if recorded is None:
        return False
    if defaults is not None:
        recorded = _with_defaults(recorded, defaults)
    keys = differing_keys(recorded, current)
    if keys and overwrite:
        return False
    if keys:
        shown = "; ".join(f"{k}: {_value(recorded, k)!r} there, {_value(current, k)!r} now" for k in keys[:6])
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        raise ResumeConflictError(f"{where} holds work made with other settings ({shown}{more}); {remedy}")
    return True
