"""Study figures from synthetic curves with hand-computed bands, fixed method colours and reproducible files."""

import hashlib
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from ssl_bench.report.plots import (FALLBACK_PALETTE, arm_colours, band_stats, entropy_hlines, make_figure,
                                    method_colour, plot_figure, plot_study)

ENT, KL, LOSS = "collapse/teacher_entropy", "collapse/kl_teacher_student", "train/loss"


def rows(method, seed, lr, values, metric=ENT):
    """One run's rows: ``values`` maps step -> value of ``metric``."""
    return [{"run_id": f"{method}-{lr}-{seed}", "seed": seed, "method": method, "lr": lr, "step": s, metric: v}
            for s, v in values.items()]


@pytest.fixture
def curves():
    """dino at lr 0.1: seeds 0, 1 log entropy 1.0 / 3.0 at step 0; only seed 0 logs step 10 (5.0)."""
    data = (rows("dino", 0, 0.1, {0: 1.0, 10: 5.0}) + rows("dino", 1, 0.1, {0: 3.0})
            + rows("dino_no_centering", 0, 0.1, {0: 4.0, 10: 0.5})
            + rows("dino", 0, 0.1, {0: 2.0, 10: 1.0}, metric=LOSS)
            + rows("dino_no_centering", 0, 0.1, {0: 2.5, 10: 2.25}, metric=LOSS))
    return pd.DataFrame(data)


def test_std_band_is_mean_plus_minus_sample_std_of_the_seeds_present(curves):
    stats = band_stats(curves, ["method"], ENT, band="std")
    dino = stats["dino"]
    assert dino.loc[0, "mean"] == 2.0 and dino.loc[0, "n"] == 2
    assert dino.loc[0, "low"] == pytest.approx(2.0 - math.sqrt(2.0))
    assert dino.loc[0, "high"] == pytest.approx(2.0 + math.sqrt(2.0))
    # Step 10: one seed logged; its value is the mean and the band has no width.
    assert list(dino.loc[10, ["mean", "low", "high", "n"]]) == [5.0, 5.0, 5.0, 1]
    assert list(stats) == ["dino", "dino_no_centering"]


def test_range_band_is_min_to_max(curves):
    dino = band_stats(curves, ["method"], ENT, band="range")["dino"]
    assert (dino.loc[0, "low"], dino.loc[0, "mean"], dino.loc[0, "high"]) == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="band"):
        band_stats(curves, ["method"], ENT, band="iqr")


def test_a_redone_step_keeps_its_last_value_and_non_finite_values_are_dropped():
    # After a resume from step 10 the run logs step 10 again (9.0 then 5.0); "nan" is how inf/nan are logged.
    data = pd.DataFrame(rows("dino", 0, 0.1, {0: 1.0}) + rows("dino", 0, 0.1, {10: 9.0})
                        + rows("dino", 0, 0.1, {10: 5.0}) + rows("dino", 1, 0.1, {10: 7.0, 20: "nan"}))
    dino = band_stats(data, ["method"], ENT)["dino"]
    assert list(dino.index) == [0, 10]
    assert dino.loc[10, "mean"] == 6.0 and dino.loc[10, "n"] == 2


def test_known_method_colours_are_fixed_and_unknown_ones_hash_stably_across_processes():
    assert method_colour("dino") == "#1f77b4" and method_colour("dino_no_centering") == "#d62728"
    assert method_colour("dino") == method_colour("dino")
    name = "my_new_method"
    expected = FALLBACK_PALETTE[int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % len(FALLBACK_PALETTE)]
    assert method_colour(name) == expected
    code = f"from ssl_bench.report.plots import method_colour; print(method_colour({name!r}))"
    for salt in ("1", "2"):  # a salted hash() would differ between these two processes
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": salt})
        assert other.stdout.strip() == expected


def test_arms_sharing_a_method_keep_its_colour_and_vary_line_style_then_shade():
    arms = ["dino, 0.1", "dino, 0.2", "dino_no_centering, 0.1", "dino, 0.3", "dino, 0.4", "dino, 0.5",
            "dinov2_no_ibot, 0.1"]
    styles = arm_colours(arms)
    assert [styles[a]["linestyle"] for a in arms[:2] + arms[3:6]] == ["-", "--", ":", "-.", "-"]
    assert {styles[a]["color"] for a in arms[:2] + arms[3:5]} == {"#1f77b4"}
    # The fifth dino arm: #1f77b4 mixed 25% with white = (31+224/4, 119+136/4, 180+75/4) = (87, 153, 198.75).
    assert styles["dino, 0.5"]["color"] == "#5799c7"
    assert styles["dino_no_centering, 0.1"] == {"color": "#d62728", "linestyle": "-"}
    assert styles["dinov2_no_ibot, 0.1"]["color"] == method_colour("dinov2_no_ibot")  # longest name wins
    assert arm_colours(["x"], methods=["dino"])["x"]["color"] == "#1f77b4"


def test_figure_lines_are_the_seed_means_with_seed_counts_and_reference_lines(curves):
    fig = make_figure(curves, ["method", "lr"], [ENT, LOSS], hlines=entropy_hlines(4))
    entropy, loss = fig.axes
    lines = {ln.get_label(): ln for ln in entropy.get_lines() if not ln.get_label().startswith("_")}
    assert sorted(lines) == ["dino, 0.1 (n=2)", "dino_no_centering, 0.1 (n=1)"]
    assert list(lines["dino, 0.1 (n=2)"].get_ydata()) == [2.0, 5.0]
    assert lines["dino, 0.1 (n=2)"].get_color() == "#1f77b4"
    assert [ln.get_ydata()[0] for ln in entropy.get_lines() if ln.get_label().startswith("_")] == \
        [pytest.approx(math.log(4))]
    assert any("log K = 1.39" in t.get_text() for t in entropy.texts)
    loss_lines = [ln.get_label() for ln in loss.get_lines()]
    assert loss_lines == ["dino, 0.1 (n=1)", "dino_no_centering, 0.1 (n=1)"]


def test_an_arm_keeps_its_style_in_a_figure_where_an_earlier_arm_logged_nothing():
    data = pd.DataFrame(rows("dino", 0, 0.1, {0: 1.0}) + rows("dino", 0, 0.2, {0: 2.0}, metric=LOSS))
    (ax,) = make_figure(data, ["method", "lr"], [LOSS]).axes
    (line,) = ax.get_lines()
    assert line.get_label() == "dino, 0.2 (n=1)" and line.get_linestyle() == "--"


def test_plot_figure_writes_png_and_pdf_byte_identical_on_rewrite(curves, tmp_path):
    first = plot_figure(curves, ["method"], [ENT, KL], tmp_path / "a" / "fig", title="t", band="range")
    again = plot_figure(curves, ["method"], [ENT, KL], tmp_path / "b" / "fig", title="t", band="range")
    assert first == [tmp_path / "a" / "fig.png", tmp_path / "a" / "fig.pdf"]
    assert first[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first[1].read_bytes()[:5] == b"%PDF-"
    for a, b in zip(first, again):
        assert a.stat().st_size > 1000 and a.read_bytes() == b.read_bytes()
    (_, kl_panel) = make_figure(curves, ["method"], [ENT, KL]).axes
    assert kl_panel.get_lines() == [] and kl_panel.texts[0].get_text() == f"no run logged {KL}"


def test_plot_study_skips_figures_whose_metrics_no_run_logged(curves, tmp_path):
    result = plot_study(curves, ["method"], tmp_path, "toy", figures=("collapse", "knn", "loss"))
    assert result["collapse"] == [tmp_path / "toy_collapse.png", tmp_path / "toy_collapse.pdf"]
    assert result["loss"] == [tmp_path / "toy_loss.png", tmp_path / "toy_loss.pdf"]
    assert result["knn"] == [] and result.skipped == {"knn": "no run logged knn/top1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_collapse.pdf", "toy_collapse.png",
                                                          "toy_loss.pdf", "toy_loss.png"]
    with pytest.raises(ValueError, match="unknown figure"):
        plot_study(curves, ["method"], tmp_path, "toy", figures=("nope",))
