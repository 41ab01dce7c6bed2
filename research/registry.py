"""Name -> implementation registries: one source of truth for every choice a config names.

An optimizer, a schedule, a corpus, a parameterization, an attention or matmul
kernel, a logger backend: each is registered once, with an optional check of
whether it can run here. The config validates names against the registry,
the docs list them from it, and a plugin adds entries under its own `source`
name, so a run only sees the entries of the plugins it enabled.

Registries hold entries, not run state: registering is done at import time
(core modules, and a plugin's `setup()`), and re-registering the same name from
the same source replaces the entry, so re-importing is harmless.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

CORE = "core"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered choice.

    available(*args) -> None where it can run, else a one-line reason; what the
    args are is the registry's convention (a kernel gets a `kernels.Context`).
    rank, auto: how `auto` picks among kernels: the highest-ranked entry whose
    `auto(*args)` is true and that is available.
    """

    name: str
    impl: Any
    available: Callable[..., str | None] | None = None
    source: str = CORE
    doc: str = ""
    rank: int = 0
    auto: Callable[..., bool] | None = None

    def unavailable(self, *args) -> str | None:
        """Why this entry cannot run for `args`, or None."""
        return None if self.available is None else self.available(*args)


class Registry:
    """Named entries of one kind (e.g. "optimizer")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, impl: Any = None, *, available=None, source: str = CORE,
                 doc: str = "", rank: int = 0, auto=None):
        """Register `impl` under `name`; without `impl`, a decorator that registers its target."""

        def add(target):
            old = self._entries.get(name)
            if old is not None and old.source != source:
                raise ValueError(f"{self.kind} {name!r} is already registered by {old.source}")
            self._entries[name] = Entry(name, target, available, source, doc or _first_line(target),
                                        rank, auto)
            return target

        return add if impl is None else add(impl)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}") from None

    def names(self, sources: Iterable[str] | None = None) -> tuple[str, ...]:
        """Registered names, in registration order; only those from `sources` if given."""
        keep = None if sources is None else set(sources)
        return tuple(n for n, e in self._entries.items() if keep is None or e.source in keep)

    def entries(self, sources: Iterable[str] | None = None) -> list[Entry]:
        return [self._entries[n] for n in self.names(sources)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def _first_line(target) -> str:
    doc = getattr(target, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
