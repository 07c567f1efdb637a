"""Progress output for long feature extractions: a tqdm bar, or plain lines when bars are off (batch jobs)."""

from __future__ import annotations

import time
from typing import Callable, Optional

from ssl_bench import config as config_lib
from ssl_bench import dist

Update = Callable[[int, int], None]


def feature_progress(cfg: config_lib.Config, label: str) -> Optional[Update]:
    """A progress callback for feature extraction: a tqdm bar, or with bars off (batch jobs) a plain
    line at every 10% of the batches, so a long extraction is never silent."""
    if not cfg.tracking.progress_bar:
        return _progress_lines(f"k-NN {label}") if dist.rank() == 0 else None
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"k-NN {label}", unit="batch", leave=False)
        bar.update(1)
        if done == total:
            bar.close()

    return update


def _progress_lines(label: str) -> Update:
    start = time.time()

    def update(done: int, total: int) -> None:
        step = max(total // 10, 1)
        if total > 0 and (done % step == 0 or done == total):
            elapsed = time.time() - start
            eta = elapsed / done * (total - done)
            print(f"[ssl-bench] {label}: {done}/{total} batches, {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)

    return update
