"""Study names: the folder ``runs/<study>/`` a run's records go in, refused unless safe."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ssl_bench.config.hashing import run_id
from ssl_bench.config.rules import ConfigError
from ssl_bench.config.sections import Config

# Study names become a folder under tracking.runs_root: a letter or digit, then letters, digits, '.', '_', '-'.
STUDY_NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STUDY_NAME_TEXT = ("1-100 characters: a letter or digit, then letters, digits, '.', '_' or '-' "
                   "(no '/', no '..', no spaces)")


def check_study_name(name: Any, source: str = "study") -> str:
    """Return ``name`` if it is a safe folder name for ``runs/<study>/``; ConfigError naming the rule otherwise."""
    if not isinstance(name, str) or not STUDY_NAME_RULE.match(name) or ".." in name:
        raise ConfigError(f"study name {name!r} ({source}) is not allowed: a study name must be {STUDY_NAME_TEXT}")
    return name


def run_dir(cfg: Config) -> Path:
    """``<runs_root>/<study>/<run_id>``: where a run's records live, always inside ``tracking.runs_root``."""
    check_study_name(cfg.study, "key 'study'")
    root = Path(cfg.tracking.runs_root)
    directory = root / cfg.study / run_id(cfg)
    # Lexical ('..' folded, not symlinks followed): a runs/<study> symlink to scratch space stays allowed.
    resolved_root = root.resolve()
    if not Path(os.path.normpath(resolved_root / cfg.study / run_id(cfg))).is_relative_to(resolved_root):
        raise ConfigError(f"run directory {str(directory)!r} would lie outside tracking.runs_root="
                          f"{cfg.tracking.runs_root!r}; check the key 'study' ({cfg.study!r})")
    return directory
