"""``results gaps``: the baseline row against every other row, by k pooled seed stds, with known values."""

import io
import math
from pathlib import Path

import pandas as pd
import pytest

from ssl_bench.config import ConfigError
from ssl_bench.report.aggregate import Cell
from ssl_bench.report.gaps import gaps, pooled_std, render_gaps

REPO = Path(__file__).resolve().parents[2]


def runs(values, status=None, metric="knn_top1"):
    """One DataFrame row per (method, seed) -> metric; ``status`` overrides some runs' status."""
    rows = []
    for (method, seed), value in values.items():
        state = (status or {}).get((method, seed), "completed")
        rows.append({"run_id": f"{method}-{seed}", "method": method, "seed": seed, "status": state,
                     metric: value if state == "completed" else None, "git_sha": "a" * 40, "git_dirty": False,
                     "protocol": None})
    return pd.DataFrame(rows)


HAND = runs({("dino", 0): 80.0, ("dino", 1): 82.0, ("dino", 2): 84.0,   # mean 82, std 2
             ("a", 0): 75.0, ("a", 1): 78.0, ("a", 2): 75.0,            # mean 76, std sqrt(3)
             ("b", 0): 81.0, ("b", 1): 80.0, ("b", 2): 79.0,            # mean 80, std 1
             ("c", 0): 70.0, ("c", 1): 72.0, ("c", 2): 0.0},            # seed 2 failed: mean 71, std sqrt(2)
            status={("c", 2): "failed"})


def test_pooled_std_by_hand():
    assert pooled_std([Cell("m", [80, 82, 84]), Cell("m", [75, 78, 75])]) == pytest.approx(math.sqrt(3.5))
    # unequal seeds: (2 * 4 + 1 * 2) / (2 + 1), not the mean of the variances (3)
    assert pooled_std([Cell("m", [80, 82, 84]), Cell("m", [70, 72])]) == pytest.approx(math.sqrt(10 / 3))
    assert pooled_std([Cell("m", [80])]) is None
    assert pooled_std([Cell("m", [80]), Cell("m", [1, 3])]) == pytest.approx(math.sqrt(2))  # n=1 has no dof


def test_gaps_by_hand():
    result = {g.label: g for g in gaps(HAND, ["method"], "knn_top1", "dino")}
    assert list(result) == ["a", "b", "c"]
    a, b, c = result["a"], result["b"], result["c"]
    assert (a.gap, a.per_seed) == (pytest.approx(6.0), [(0, 5.0), (1, 4.0), (2, 9.0)])
    assert a.pooled == pytest.approx(math.sqrt(3.5)) and a.met(a.pooled) is True  # 6 > 3.74
    assert b.gap == pytest.approx(2.0) and b.met(b.pooled) is False                # 2 < 2 * sqrt(2.5) = 3.16
    assert (c.gap, c.per_seed, c.other.n) == (pytest.approx(11.0), [(0, 10.0), (1, 10.0)], 2)
    assert c.pooled == pytest.approx(math.sqrt(10 / 3))
    # all four rows: (2 * 4 + 2 * 3 + 2 * 1 + 1 * 2) / 7
    assert a.pooled_all == pytest.approx(math.sqrt(18 / 7))
    # a stricter multiplier flips row a: 6 < 4 * sqrt(3.5) = 7.48
    assert {g.label: g.met(g.pooled) for g in gaps(HAND, ["method"], "knn_top1", "dino", times=4)}["a"] is False


def test_markdown_and_csv():
    text = render_gaps(HAND, "hand", ["method"], "knn_top1", "dino", command="ssl-bench results gaps x")
    line = next(s for s in text.splitlines() if s.startswith("| a |"))
    assert [x.strip() for x in line.split("|")[1:-1]] == [
        "a", "76.00", "6.00", "0: 5.00, 1: 4.00, 2: 9.00", f"{2 * math.sqrt(3.5):.2f}", "yes",
        f"{2 * math.sqrt(18 / 7):.2f}", "yes", "3/3"]
    assert "| b | 80.00 | 2.00 |" in text and "**no**" in text
    assert "2/3" in next(s for s in text.splitlines() if s.startswith("| c |"))
    assert text.startswith("`dino`: 82.00 ± 2.00 (3/3)")
    assert "study `hand`: 12 runs, 11 completed, 1 failed" in text and "command: `ssl-bench results gaps x`" in text
    csv = pd.read_csv(io.StringIO(render_gaps(HAND, "hand", ["method"], "knn_top1", "dino", fmt="csv")), comment="#")
    row = csv.set_index("row").loc["b"]
    assert (row["gap"], row["threshold"], row["met"]) == (pytest.approx(2.0), pytest.approx(2 * math.sqrt(2.5)),
                                                          False)
    tex = render_gaps(HAND, "hand", ["method"], "knn_top1", "dino", fmt="tex")
    assert "\\toprule" in tex and "**" not in tex


def test_lower_is_better_reverses_the_sign():
    df = runs({("dino", 0): 100.0, ("dino", 1): 110.0, ("slow", 0): 150.0, ("slow", 1): 160.0}, metric="timing.wall_s")
    (slow,) = gaps(df, ["method"], "timing.wall_s", "dino")
    assert slow.gap == pytest.approx(50.0) and slow.per_seed == [(0, 50.0), (1, 50.0)]


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match=r"--baseline 'DINO'.*valid: dino, a, b, c"):
        gaps(HAND, ["method"], "knn_top1", "DINO")
    with pytest.raises(ConfigError, match=r"--cols 'linear_top1'"):
        gaps(HAND, ["method"], "linear_top1", "dino")
    df = HAND.assign(teacher_entropy_last=1.0)
    with pytest.raises(ConfigError, match="no better direction"):
        gaps(df, ["method"], "teacher_entropy_last", "dino")
    with pytest.raises(ConfigError, match="--times"):
        gaps(HAND, ["method"], "knn_top1", "dino", times=0)


def test_committed_collapse_resnet_gaps():
    """The gap table of results/fashion_mnist_collapse_resnet/README.md, computed there by hand from runs.csv."""
    df = pd.read_csv(REPO / "results/fashion_mnist_collapse_resnet/runs.csv", comment="#")
    result = {g.label: g for g in gaps(df, ["method"], "knn_top1", "dino")}
    expected = {  # row: (gap, per-seed gaps, 2 x pooled std of dino and the row)
        "dino_no_centering": (2.77, [2.35, 4.20, 1.75], 3.09),
        "dino_no_sharpening": (2.98, [2.95, 2.55, 3.45], 1.53),
        "dino_no_centering_no_sharpening": (3.30, [3.30, 3.15, 3.45], 1.59),
        "dino_sinkhorn": (0.02, [-0.65, 0.00, 0.70], 2.11),
    }
    for label, (gap, per_seed, threshold) in expected.items():
        g = result[label]
        assert round(g.gap, 2) == gap and [round(v, 2) for _, v in g.per_seed] == per_seed
        assert round(2 * g.pooled, 2) == threshold
        assert round(2 * g.pooled_all, 2) == 2.42
    assert [label for label, g in result.items() if g.met(g.pooled)] == ["dino_no_sharpening",
                                                                         "dino_no_centering_no_sharpening"]


def test_cli(tmp_path, capsys):
    from ssl_bench.cli import main

    path = tmp_path / "runs.csv"
    HAND.assign(study="hand").to_csv(path, index=False)
    out = tmp_path / "gaps.md"
    assert main(["results", "gaps", str(path), "--baseline", "dino", "--output", str(out)]) == 0
    assert "| a | 76.00 | 6.00 |" in out.read_text()
    assert main(["results", "gaps", str(path), "--baseline", "nope"]) == 2
    assert "--baseline 'nope'" in capsys.readouterr().err


def test_committed_collapse_full_gaps_match_its_runs():
    """results/fashion_mnist_collapse_full/gaps.md is what `results gaps` gives on the committed runs.csv."""
    folder = REPO / "results/fashion_mnist_collapse_full"
    df = pd.read_csv(folder / "runs.csv", comment="#")
    fresh = render_gaps(df, "fashion_mnist_collapse_full", ["method"], "knn_top1", "dino")
    committed = (folder / "gaps.md").read_text()
    table = [line for line in fresh.splitlines() if line.startswith(("|", "`dino`"))]
    assert table == [line for line in committed.splitlines() if line.startswith(("|", "`dino`"))]
    result = gaps(df, ["method"], "knn_top1", "dino")
    assert [g.label for g in result if g.met(g.pooled) and g.met(g.pooled_all)] == [
        "dino_no_centering", "dino_no_sharpening", "dino_no_centering_no_sharpening"]  # the README's claim
