"""Run ids: a short hash of every key whose field is declared hashed (``checked(..., hashed=...)``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ssl_bench.config.rules import UNLESS_DEFAULT
from ssl_bench.config.schema import get_dotted, to_dict, walk
from ssl_bench.config.sections import Config


def hashing(item: dataclasses.Field) -> Any:
    """How the run id treats a field: True, False or UNLESS_DEFAULT (undeclared: True)."""
    return item.metadata.get("hashed", True)


def default(item: dataclasses.Field) -> Any:
    """A field's default value (built afresh from its default_factory if it has one)."""
    return item.default_factory() if item.default is dataclasses.MISSING else item.default


def declared(schema: type, how: Any) -> dict[str, dataclasses.Field]:
    """The dotted keys under ``schema`` whose fields declare ``hashed=how``; an unhashed section is one key."""
    return {key: item for key, item in walk(schema, into=lambda item: hashing(item) is True)
            if hashing(item) == how}


# Keys that do not change what is computed, so they stay out of the run id.
UNHASHED_KEYS = tuple(declared(Config, False))
# Keys added after runs existed: at their default they stay out of the run id, so old run ids still hold.
HASHED_UNLESS_DEFAULT = {key: default(item) for key, item in declared(Config, UNLESS_DEFAULT).items()}


def _parent(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The mapping that holds ``dotted``'s last part, and that part."""
    parent, _, name = dotted.rpartition(".")
    return (get_dotted(tree, parent) if parent else tree), name


def config_hash(cfg: Config, length: int = 8) -> str:
    """Stable short hash of everything that changes what a run computes."""
    tree = to_dict(cfg)
    for key in UNHASHED_KEYS:
        node, name = _parent(tree, key)
        node.pop(name, None)
    for key, value in HASHED_UNLESS_DEFAULT.items():
        node, name = _parent(tree, key)
        if node.get(name) == value:
            del node[name]
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_id(cfg: Config) -> str:
    """``<method>-<hash>``: readable in listings, unique per resolved config."""
    return f"{cfg.method.name}-{config_hash(cfg)}"
