"""The ``ssl-bench`` parser: one subcommand group per module of this package."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ssl_bench import config as config_lib
from ssl_bench import tracking
from ssl_bench.cli.bench import add_bench_parser
from ssl_bench.cli.eval import add_eval_parser
from ssl_bench.cli.grid import add_grid_parser
from ssl_bench.cli.results import add_results_parser
from ssl_bench.cli.train import add_train_parsers


DESCRIPTION = "ssl-bench: methods, datasets, train, grid plan|launch|status, eval, results, bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-bench", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parsers(sub)
    add_grid_parser(sub)
    add_eval_parser(sub)

    add_results_parser(sub)
    add_bench_parser(sub)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides follow options too (``eval knn RUN --device cpu k=v``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    bucket = "overrides" if hasattr(args, "overrides") else "inputs" if hasattr(args, "inputs") else None
    if stray or (extra and bucket is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        setattr(args, bucket, [*getattr(args, bucket), *extra])
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for provenance footers
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except (config_lib.ConfigError, tracking.CorruptRecordError) as exc:  # user errors: one line, no traceback
        print(f"ssl-bench: error: {exc}", file=sys.stderr)
        return 2

