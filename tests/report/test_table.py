"""Aggregation over synthetic run directories with known values: statistics, run states, bolding, formats."""

import io
import json
import math
import re

import pandas as pd
import pytest

from ssl_bench.config import ConfigError
from ssl_bench.report.aggregate import aggregate, t975
from ssl_bench.report.collect import collect
from ssl_bench.report.references import load_reference
from ssl_bench.report.table import TableSpec, render, tex_escape

PROTOCOL = {"knn": {"k": 20, "temperature": 0.07, "features": "cls", "bank": "b", "test": "t"}}


def make_run(root, run_id, method, seed, status="completed", knn=None, init=None, wall=60.0, collapsed=None,
             extra=None):
    d = root / run_id
    d.mkdir(parents=True)
    result = {"run_id": run_id, "method": method, "seed": seed, "status": status}
    if status == "completed":
        metrics = {"knn_top1": knn, "knn_top1_init": init, **(extra or {})}
        result.update(metrics={k: v for k, v in metrics.items() if v is not None}, timing={"wall_s": wall},
                      protocol=PROTOCOL)
        if collapsed is not None:
            result["collapse"] = {"collapsed": collapsed, "collapse_step": 40 if collapsed else None}
    if status == "failed":
        result["error"] = "RuntimeError: boom"
    (d / "result.json").write_text(json.dumps(result))
    (d / "env.json").write_text(json.dumps({"git": {"sha": "abcdef1234567", "dirty": False}, "world_size": 1,
                                            "hardware": {"cpu_count": 2, "processor": "x86_64", "cuda": False},
                                            "versions": {"torch": "2.14.1"}}))
    (d / "config.yaml").write_text("data:\n  name: fashion_mnist\n  subset: 6400\n  batch_size: 32\n"
                                   "backbone:\n  name: vit_tiny\noptim:\n  epochs: 1\n")
    return {"run_id": run_id, "run_dir": d, "seed": seed, "method": method, "axes": {"method": method}}


@pytest.fixture
def study(tmp_path):
    """dino: 3 seeds (80, 82, 84); no_centering: 1 completed (70), 1 failed, 1 missing; sinkhorn: 1 running."""
    runs = [make_run(tmp_path, "a0", "dino", 0, knn=80.0, init=70.0, wall=60),
            make_run(tmp_path, "a1", "dino", 1, knn=82.0, init=71.0, wall=120),
            make_run(tmp_path, "a2", "dino", 2, knn=84.0, init=72.0, wall=90),
            make_run(tmp_path, "b0", "dino_no_centering", 0, knn=70.0, init=70.0, collapsed=True),
            make_run(tmp_path, "b1", "dino_no_centering", 1, status="failed"),
            {"run_id": "b2", "run_dir": tmp_path / "b2", "seed": 2, "method": "dino_no_centering",
             "axes": {"method": "dino_no_centering"}},
            make_run(tmp_path, "c0", "dino_sinkhorn", 0, status="running")]
    return collect(runs)


def test_statistics_and_run_states(study):
    assert list(study["status"]) == ["completed"] * 4 + ["failed", "missing", "running"]
    cells = aggregate(study, ["method"], ["knn_top1"])
    dino = cells["dino"]["knn_top1"]
    assert dino.mean == pytest.approx(82.0) and dino.std == pytest.approx(2.0)  # (80, 82, 84), ddof=1
    assert dino.ci95 == pytest.approx(4.303 * 2.0 / math.sqrt(3))  # t(0.975, 2) = 4.303
    nc = cells["dino_no_centering"]["knn_top1"]
    assert (nc.n, nc.expected, nc.not_counted, nc.collapsed) == (1, 3, {"failed": 1, "missing": 1}, 1)
    assert cells["dino_sinkhorn"]["knn_top1"].mean is None


def test_t_quantiles_match_independent_values():
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)  # standard table: t(0.975, 40) = 2.021
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)  # t(0.975, 120) = 1.980
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 5, 29, 31, 60, 500):
        assert t975(dof) == pytest.approx(scipy_stats.t.ppf(0.975, dof), abs=1e-3)


def test_markdown_cells_say_what_is_missing(study):
    text = render(study, "s", TableSpec(rows=["method"], metrics=["knn_top1", "knn_top1_init"]), "md")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| dino")}
    assert lines["dino"] == ["3/3", "**82.00 ± 2.00**", "**71.00 ± 1.00**"]
    assert lines["dino_no_centering"] == ["1/3", "70.00 (n=1 of 3: 1 failed, 1 missing; 1 collapsed)",
                                          "70.00 (n=1 of 3: 1 failed, 1 missing)"]  # init: before any collapse
    assert lines["dino_sinkhorn"] == ["0/1", "1 running", "1 running"]
    assert "RuntimeError: boom" in text and "| b2" in text  # incomplete runs listed with their error
    assert "7 runs, 4 completed, 1 failed, 1 running, 1 missing" in text
    assert "abcdef1234" in text and "k=20, T=0.07" in text
    assert "data: fashion_mnist (training subset 6400); backbone vit_tiny; epochs 1; batch 32" in text
    assert "hardware: 2 CPU cores (x86_64); world size 1; torch 2.14.1" in text


def test_setup_line_names_accumulated_micro_batches(tmp_path):
    runs = [make_run(tmp_path, f"r{i}", "dino", i, knn=50.0) for i in range(2)]
    config = runs[1]["run_dir"] / "config.yaml"
    config.write_text(config.read_text() + "  accumulate_grad_batches: 4\n")  # under optim:
    text = render(collect(runs), "s", TableSpec(rows=["method"], metrics=["knn_top1"]), "md")
    assert "epochs 1; batch 32 x 4 accumulated micro-batches" in text  # 1 (older record: absent) and 4
    assert "epochs 1; batch 32\n" in render(collect(runs[:1]), "s", TableSpec(rows=["method"], metrics=["knn_top1"]), "md")


def test_ci_option_and_lower_is_better_bolding(tmp_path):
    runs = [make_run(tmp_path, f"r{i}", m, i, knn=k, wall=w)
            for i, (m, k, w) in enumerate([("a", 50.0, 100.0), ("a", 54.0, 120.0), ("b", 60.0, 300.0),
                                           ("b", 60.0, 310.0)])]
    df = collect(runs)
    text = render(df, "s", TableSpec(rows=["method"], metrics=["knn_top1", "timing.wall_s"], ci=True), "md")
    a_line = next(line for line in text.splitlines() if line.startswith("| a "))
    half = 12.706 * math.sqrt(8) / math.sqrt(2)  # std of (50, 54) = sqrt(8); t(0.975, 1) = 12.706
    assert f"52.00 ± {half:.2f}" in a_line and "**110.00 ± 127.06**" in a_line  # lower wall time is better
    assert "**60.00 ± 0.00**" in text and "95% confidence half-width" in text


def test_collapse_diagnostics_are_never_bolded(tmp_path):
    runs = [make_run(tmp_path, "r0", "a", 0, knn=1.0, extra={"teacher_entropy_last": 0.1}),
            make_run(tmp_path, "r1", "b", 0, knn=2.0, extra={"teacher_entropy_last": 6.9})]
    text = render(collect(runs), "s", TableSpec(rows=["method"], metrics=["teacher_entropy_last"]), "md")
    assert "**" not in text.split("\n\n")[0]


def test_latex_is_booktabs_balanced_and_escaped(study):
    tex = render(study, "s_1", TableSpec(rows=["method"], metrics=["knn_top1"]), "tex")
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert body[0] == r"\begin{tabular}{lrr}" and body[-1] == r"\end{tabular}"
    assert [line for line in body if line in (r"\toprule", r"\midrule", r"\bottomrule")] == \
        [r"\toprule", r"\midrule", r"\bottomrule"]
    rows = body[2:3] + body[4:-2]
    assert all(line.endswith(r"\\") and line.count("&") == 2 for line in rows)
    assert r"dino\_no\_centering" in tex and r"\textbf{82.00 $\pm$ 2.00}" in tex
    assert "k-NN top-1 (\\%)" in tex
    unescaped = [line for line in body if re.search(r"(?<!\\)[_%&#]", line.replace(" & ", " "))]
    assert unescaped == []
    assert all(line.startswith("% ") for line in tex.splitlines() if "abcdef1234" in line)
    assert tex.count("{") == tex.count("}")


def test_tex_escape_table():
    assert tex_escape("a_b & 5% #1 ±") == r"a\_b \& 5\% \#1 $\pm$"


def test_reference_deltas(tmp_path, study):
    ref = tmp_path / "ref.yaml"
    ref.write_text("title: Paper T7\nsource: Caron et al. 2021, Table 7\nrows:\n  dino: {knn_top1: 72.8}\n"
                   "  dino_sinkhorn: {knn_top1: 72.2}\n  dino_momentum0: {knn_top1: 0.1}\n")
    spec = TableSpec(rows=["method"], metrics=["knn_top1"], reference=load_reference(ref))
    text = render(study, "s", spec, "md")
    dino = next(line for line in text.splitlines() if line.startswith("| dino |"))
    assert "| 72.80 | +9.20 |" in dino  # 82.00 - 72.80
    assert "Paper T7 (Caron et al. 2021, Table 7" in text
    assert "reference rows not in this study: dino_momentum0" in text
    csv = pd.read_csv(io.StringIO(render(study, "s", spec, "csv")), comment="#")
    row = csv[csv["method"] == "dino"].iloc[0]
    assert row["reference"] == 72.8 and row["delta"] == pytest.approx(9.2) and row["n"] == 3
    assert row["std"] == pytest.approx(2.0)


def test_wildcard_reference_row(tmp_path, study):
    ref = tmp_path / "pixels.yaml"
    ref.write_text("title: raw pixels\nsource: k-NN on pixels\nrows:\n  '*': {knn_top1: 86.05}\n")
    text = render(study, "s", TableSpec(rows=["method"], metrics=["knn_top1"], reference=load_reference(ref)), "md")
    assert "| 86.05 | -4.05 |" in text  # dino 82.00 - 86.05


def test_bad_reference_and_columns_are_named(tmp_path, study):
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nsource: y\nrowz: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'rowz'.*did you mean 'rows'"):
        load_reference(bad)
    other = tmp_path / "other.yaml"
    other.write_text("title: x\nsource: y\nrows:\n  dino: {linear_top1: 1.0}\n")
    with pytest.raises(ConfigError, match="linear_top1.*not a column"):
        render(study, "s", TableSpec(rows=["method"], metrics=["knn_top1"], reference=load_reference(other)))
    with pytest.raises(ConfigError, match="--cols 'knn_top9'.*valid: .*knn_top1"):
        render(study, "s", TableSpec(rows=["method"], metrics=["knn_top9"]))
    with pytest.raises(ConfigError, match="--rows 'optim.lr'.*valid: method"):
        render(study, "s", TableSpec(rows=["optim.lr"], metrics=["knn_top1"]))
    with pytest.raises(ConfigError, match="does not exist"):
        load_reference(tmp_path / "nope.yaml")


def test_collapse_note_skips_metrics_measured_at_init(study):
    cells = aggregate(study, ["method"], ["knn_top1", "knn_top1_init"])["dino_no_centering"]
    assert cells["knn_top1"].collapsed == 1 and cells["knn_top1_init"].collapsed == 0


def test_protocol_lines_differing_only_by_seed_are_merged():
    from ssl_bench.report.table import merge_seeds

    lines = [f"k-NN protocol: bank = train subset 5000 (seed {s}); test = test subset 1000 (seed {s})" for s in (2, 0, 1)]
    assert merge_seeds(lines) == ["k-NN protocol: bank = train subset 5000 (seeds 0, 1, 2); "
                                  "test = test subset 1000 (seeds 0, 1, 2)"]
    assert merge_seeds(["a (seed 0)", "b"]) == ["a (seed 0)", "b"]


def test_corrupt_records_are_reported_as_corrupt_with_the_reason(tmp_path):
    runs = [make_run(tmp_path, "a0", "dino", 0, knn=80.0), make_run(tmp_path, "a1", "dino", 1, knn=82.0),
            make_run(tmp_path, "a2", "dino", 2, knn=84.0)]
    (tmp_path / "a2" / "result.json").write_text('{"status": "completed", "metrics": {"knn_to')  # torn
    (tmp_path / "a1" / "env.json").write_text('{"git": {"sha": "abc')
    df = collect(runs)
    assert list(df["status"]) == ["completed", "completed", "corrupt"]  # kept, not dropped or "missing"
    assert df.loc[2, "error"].startswith("result.json corrupt: not JSON: Unterminated string")
    assert df.loc[1, "env_error"].startswith("env.json corrupt: not JSON:") and pd.isna(df.loc[0, "env_error"])
    text = render(df, "s", TableSpec(["method"], ["knn_top1"]))
    assert "81.00 ± 1.41 (n=2 of 3: 1 corrupt)" in text
    assert "3 runs, 2 completed, 1 corrupt" in text
    code = next(line for line in text.splitlines() if line.startswith("- code: git"))
    assert "env.json corrupt: not JSON:" in code and "abcdef1234" in code and "not a git checkout" not in code
    bad = text.split("Runs not in the statistics")[1]
    assert "| a2 " in bad and "corrupt" in bad and "result.json corrupt: not JSON" in bad


def test_torn_metric_lines_are_counted_in_the_footer(tmp_path):
    runs = [make_run(tmp_path, "a0", "dino", 0, knn=80.0), make_run(tmp_path, "a1", "dino", 1, knn=82.0)]
    (tmp_path / "a0" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n{"st')
    (tmp_path / "a1" / "metrics.jsonl").write_text('{"step": 1}\n')
    df = collect(runs)
    assert list(df["metrics_torn_lines"]) == [2, 0]
    text = render(df, "s", TableSpec(["method"], ["knn_top1"]))
    assert "- metrics.jsonl: 2 torn line(s) skipped in 1 run" in text
    assert "metrics_torn_lines" not in text.split("\n\n")[0]  # a bookkeeping column, never a metric
    (tmp_path / "a0" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert "torn line" not in render(collect(runs), "s", TableSpec(["method"], ["knn_top1"]))


def test_read_json_marks_a_corrupt_record_for_status_listings(tmp_path):
    from ssl_bench.report.collect import read_json

    assert read_json(tmp_path / "absent.json") is None
    (tmp_path / "result.json").write_text("")
    assert read_json(tmp_path / "result.json")["status"] == "corrupt (result.json: empty file)"
