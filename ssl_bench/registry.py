"""Generic name -> factory registry with "did you mean" errors."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name was looked up; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered factory with a one-line description."""

    name: str
    factory: T
    description: str


class Registry(Generic[T]):
    """Maps names to factories, e.g. method names to LightningModule classes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("dino", "DINO (Caron et al. 2021)")``."""

        def add(factory: T) -> T:
            self.add(name, factory, description)
            return factory

        return add

    def add(self, name: str, factory: T, description: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if not description:  # fall back to the factory's docstring summary line
            lines = (getattr(factory, "__doc__", None) or "").strip().splitlines()
            description = lines[0] if lines else ""
        self._entries[name] = Entry(name, factory, description)

    def get(self, name: str) -> T:
        return self.entry(name).factory

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise RegistryError(unknown_choice_message(self.kind, name, self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


def unknown_choice_message(kind: str, name: object, choices: list[str]) -> str:
    """'unknown method 'dnio'; did you mean 'dino'? valid: a, b, c'."""
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(str(name), choices, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    return msg + f" Valid {kind}s: {', '.join(choices)}"
