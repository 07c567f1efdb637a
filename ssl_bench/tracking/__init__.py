"""The run directory, the source of truth (DESIGN.md §1): its layout, its records, the writer, the W&B mirror.

- ``layout``: the one place that names the run directory's files, statuses and metric keys;
- ``records``: strict JSON records and metric lines (torch-free: report/ reads them);
- ``owner``: which process owns a running record, and whether it is lost;
- ``writer``: config/env/result records, attempts, metrics.jsonl (a Lightning logger), W&B hooks;
- ``wandb_mirror``: the W&B run that mirrors the directory.

Importing this package stays torch-free: names of ``owner`` and ``writer`` (which import torch or
Lightning) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ssl_bench.tracking.layout import *  # noqa: F401,F403  (the layout's names are the package's)
from ssl_bench.tracking.layout import __all__ as _LAYOUT
from ssl_bench.tracking.records import (NON_FINITE_KEY, CorruptRecordError, MetricLines, atomic_write_text,  # noqa: F401
                                        finite_json, read_json_record, read_jsonl_counted, read_metrics,
                                        read_metrics_counted, read_result, strict_json, torn_lines_text,
                                        write_json)

_LAZY = {name: "owner" for name in ("OWNER_KEY", "LOST_AFTER_S", "check_owner")}
_LAZY.update({name: "writer" for name in ("RunDir", "JsonlLogger", "record_eval", "next_attempt_dir",
                                         "archive_previous_attempt", "done_before", "set_aside_metrics",
                                         "wandb_logger", "publish_wandb")})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"ssl_bench.tracking.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ssl_bench.tracking' has no attribute {name!r}")


__all__ = [*_LAYOUT, "NON_FINITE_KEY", "CorruptRecordError", "MetricLines", "atomic_write_text", "finite_json",
           "read_json_record", "read_jsonl_counted", "read_metrics", "read_metrics_counted", "read_result",
           "strict_json", "torn_lines_text", "write_json", *_LAZY]
