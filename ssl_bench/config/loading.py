"""Loading: YAML files (duplicate keys refused), ``base:`` chains, ``key=value`` overrides, typed Configs."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_bench.config.checks import check_values
from ssl_bench.config.rules import ConfigError
from ssl_bench.config.schema import field_type, subsections
from ssl_bench.config.sections import Config
from ssl_bench.config.study import check_study_name

BASE_KEY = "base"  # a config file may name another file it extends


def check_keys(tree: dict[str, Any], schema: type = Config, prefix: str = "", source: str = "") -> None:
    """Raise ConfigError for a key that ``schema`` lacks, listing the valid keys."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(f"{prefix}{n}" for n in fields)
            raise ConfigError(f"unknown config key {path!r}{_src(source)}{hint} Valid keys here: {valid}")
        sub_cls = subsections(schema).get(key)
        if sub_cls is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r}{_src(source)} must be a mapping of sub-keys")
            check_keys(value, sub_cls, prefix=f"{path}.", source=source)


def _src(source: str) -> str:
    return f" in {source}" if source else ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.epochs=2", "data.subset=null"]`` into a nested dict (YAML values)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.epochs=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        set_dotted(tree, key.strip(), value)
    return tree


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted == "a.b.c"``."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key {dotted!r}: {part!r} is a value, not a group of keys")
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key; carries the key and both 1-based lines."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' merges are allowed to be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first is not None:
                raise _DuplicateKeyError(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (1-based) and what, instead of PyYAML's multi-line excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """Load a YAML mapping, with the file named in every error (``kind`` says what the file is)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{kind} {str(path)!r} line {exc.line}: duplicate key {exc.key!r} "
                          f"(first given on line {exc.first_line}); each key may appear once per mapping") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{kind} {str(path)!r} is not a text (UTF-8) file: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {str(path)!r} must hold a mapping of keys at the top level, "
                          f"got {_type_name(data)}")
    return data


def load_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and the ``base:`` chain it extends into one override tree."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {str(path)!r} extends itself through 'base:'")
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    check_keys(data, source=str(path))
    if "study" in data:
        check_study_name(data["study"], f"key 'study' in {str(path)!r}")
    if base is None:
        return data
    base_path = check_base(base, path)
    return deep_merge(load_config_tree(base_path, _seen + (path,)), data)


def check_base(base: Any, source: Path | str, kind: str = "config file") -> Path:
    """The file a ``base:`` key names, relative to ``source``'s folder; ConfigError unless it is one file."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{kind} {str(source)!r}: 'base' must be the path of one config file "
                          f"(relative to this file), got {_type_name(base)} {base!r}")
    base_path = Path(source).parent / base
    if not base_path.is_file():
        raise ConfigError(f"{kind} {str(source)!r}: 'base' names {base!r}, but {str(base_path)!r} does not exist")
    return base_path


def build_config(*trees: dict[str, Any], source: str = "") -> Config:
    """Merge override trees onto the defaults into a typed, validated Config."""
    merged: dict[str, Any] = {}
    for tree in trees:
        check_keys(tree, source=source)
        merged = deep_merge(merged, tree)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(merged))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        text = str(exc.msg if getattr(exc, "msg", None) else exc).splitlines()[0]  # not OmegaConf's key dump
        expected = field_type(key)
        raise ConfigError(f"config key {key!r}{_src(source)}: {text}"
                          + (f" (expected {expected})" if expected else "")) from exc
    assert isinstance(obj, Config)
    check_values(obj)
    return obj


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- config file (with its ``base:`` chain) <- ``key=value`` overrides."""
    trees = [load_config_tree(path)] if path else []
    trees.append(parse_overrides(list(overrides)))
    return build_config(*trees, source=str(path or "overrides"))


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a run's config.yaml)."""
    return build_config(tree)
