"""Config name -> implementation tables that stay open: an entry registered at run time is seen
by everything that looks names up or validates them (the loop, the pipeline, config checks)."""

from __future__ import annotations

from typing import Generic, Optional, TypeVar

from al.config import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A config names an entry no registry holds; the message lists the ones it does."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(dict, Generic[T]):
    """A ``dict`` of named implementations with :meth:`register` and :meth:`lookup`."""

    def __init__(self, kind: str, entries: Optional[dict[str, T]] = None):
        super().__init__(entries or {})
        self.kind = kind

    def register(self, name: str, value: Optional[T] = None, *, replace: bool = False):
        """Add ``value`` under ``name`` (or decorate: ``@REGISTRY.register("name")``). An existing
        name is refused unless ``replace``, so two plugins cannot silently shadow each other."""
        def add(entry: T) -> T:
            if name in self and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
            self[name] = entry
            return entry
        return add if value is None else add(value)

    def lookup(self, name: str) -> T:
        """The entry called ``name``; an unknown name is an error that lists the known ones."""
        if name not in self:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")
        return self[name]

