"""``python -m ssl_bench.cli``: the ``ssl-bench`` command."""

import sys

from ssl_bench.cli.app import main

sys.exit(main())
