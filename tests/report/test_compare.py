"""Paired differences between two result sets (one grid on two code versions) with known values."""

import io

import pandas as pd
import pytest

from ssl_bench.report.compare import render_compare
from ssl_bench.report.table import TableSpec


def runs(values, status=None):
    """One DataFrame row per (method, seed) -> knn_top1; ``status`` overrides some runs' status."""
    rows = []
    for (method, seed), knn in values.items():
        state = (status or {}).get((method, seed), "completed")
        rows.append({"run_id": f"{method}-{seed}", "method": method, "seed": seed, "status": state,
                     "knn_top1": knn if state == "completed" else None, "git_sha": "a" * 40, "git_dirty": False,
                     "protocol": None})
    return pd.DataFrame(rows)


def test_paired_differences_by_seed():
    a = runs({("dino", 0): 80.0, ("dino", 1): 82.0, ("dino", 2): 84.0, ("sk", 0): 70.0})
    # B - A per seed: +1, +3, +2 -> mean 2, std 1; sk seed 0 failed on B: unpaired
    b = runs({("dino", 0): 81.0, ("dino", 1): 85.0, ("dino", 2): 86.0, ("sk", 0): 0.0}, status={("sk", 0): "failed"})
    spec = TableSpec(rows=["method"], metrics=["knn_top1"])
    text = render_compare(a, b, ("v1", "v2"), spec, "md")
    dino = next(line for line in text.splitlines() if line.startswith("| dino"))
    cells = [c.strip() for c in dino.split("|")[2:-1]]
    assert cells == ["82.00 ± 2.00", "84.00 ± 2.65", "+2.00 ± 1.00 (n=3)"]  # std of (81, 85, 86) = sqrt(7)
    sk = next(line for line in text.splitlines() if line.startswith("| sk"))
    assert "no pairs (1 unpaired)" in sk and "1 failed" in sk
    csv = pd.read_csv(io.StringIO(render_compare(a, b, ("v1", "v2"), spec, "csv")), comment="#")
    row = csv[csv["method"] == "dino"].iloc[0]
    assert (row["diff_mean"], row["pairs"], row["unpaired"]) == (pytest.approx(2.0), 3, 0)
    assert row["diff_ci95"] == pytest.approx(4.303 / 3 ** 0.5)  # t(0.975, 2) * 1 / sqrt(3)
    assert "A = v1" in text and "B = v2" in text


def test_seed_only_on_one_side_is_unpaired():
    a = runs({("dino", 0): 80.0, ("dino", 1): 82.0})
    b = runs({("dino", 0): 79.0})
    text = render_compare(a, b, ("a", "b"), TableSpec(rows=["method"], metrics=["knn_top1"]), "md")
    assert "-1.00 (n=1, 1 unpaired)" in text
