"""The shape of a Config: its sections (from the field types), its dotted keys, its dict and YAML forms."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable, Iterator

import yaml

from ssl_bench.config.sections import Config


@functools.cache
def subsections(schema: type) -> dict[str, type]:
    """The fields of ``schema`` that hold a section, by name: those whose type is a dataclass."""
    hints = typing.get_type_hints(schema)
    return {item.name: hints[item.name] for item in dataclasses.fields(schema)
            if dataclasses.is_dataclass(hints[item.name])}


def walk(schema: type = Config, into: Callable[[dataclasses.Field], bool] = lambda item: True,
         prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every field in declaration order; a section's keys follow it when ``into`` it."""
    for item in dataclasses.fields(schema):
        key = f"{prefix}{item.name}"
        yield key, item
        if item.name in subsections(schema) and into(item):
            yield from walk(subsections(schema)[item.name], into, f"{key}.")


def field_type(dotted: str) -> str:
    """The annotated type of a dotted config key, e.g. 'list[int]' for eval.knn_k ('' if unknown)."""
    schema: Any = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            return ""
        schema = subsections(schema).get(part) or fields[part].type
    return schema if isinstance(schema, str) else getattr(schema, "__name__", str(schema))


def get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
