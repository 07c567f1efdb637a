"""``repro.peak_rss_mb`` is the process's own peak, not its parent's: the figure every memory claim rests on.

``ru_maxrss`` survives ``fork`` + ``exec`` on Linux, so every fresh benchmark process started by a large parent
(``bench compare`` holds torch, about 800 MiB) used to report at least the parent's size.
"""

import subprocess
import sys

import pytest

from ssl_bench import repro

CHILD = "from ssl_bench import repro; print(repro.peak_rss_mb())"


def _touched(mib: int) -> bytearray:
    buf = bytearray(mib * 2 ** 20)
    buf[::4096] = b"\x01" * len(buf[::4096])  # every page resident
    return buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_fresh_process_does_not_inherit_its_parents_peak():
    held = _touched(600)
    parent = repro.peak_rss_mb()
    child = float(subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                 text=True).stdout.split()[-1])
    assert parent > 600
    assert child < parent - 400, (child, parent)  # the child imports torch (~300 MiB) but never held the 600
    del held


GROWS = """
import torch
from ssl_bench import repro
before = repro.peak_rss_mb()
held = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written
during = repro.peak_rss_mb()
del held
print(before, during, repro.peak_rss_mb())
"""


def test_peak_grows_with_what_the_process_touches_and_never_falls():
    out = subprocess.run([sys.executable, "-c", GROWS], check=True, capture_output=True, text=True).stdout
    before, during, after = map(float, out.split()[-3:])  # a fresh process: no earlier test's peak above it
    assert during - before > 48
    assert after >= during - 1  # the kernel's RSS counters are per-CPU sums, exact to within a few pages
