"""``ssl-bench`` command line: one module per command group (train, eval, grid, results, bench).

Parsing and messages only; the work is done in ``run``, ``launch``, ``report`` and ``bench``.
"""

from ssl_bench.cli.app import main

__all__ = ["main"]
