"""Aggregation over synthetic run directories with known values; missing and failed runs are listed."""

import json

import pandas as pd

from ssl_bench.report.collect import collect
from ssl_bench.report.table import markdown_report, summary_table


def make_run(root, run_id, method, seed, status="completed", knn=None, init=None, wall=60.0):
    d = root / run_id
    d.mkdir(parents=True)
    result = {"run_id": run_id, "method": method, "seed": seed, "status": status}
    if status == "completed":
        result.update(metrics={"knn_top1": knn, "knn_top1_init": init}, timing={"wall_s": wall},
                      protocol={"knn": {"k": 20, "temperature": 0.07, "features": "cls", "bank": "b", "test": "t"}})
    if status == "failed":
        result["error"] = "RuntimeError: boom"
    (d / "result.json").write_text(json.dumps(result))
    (d / "env.json").write_text(json.dumps({"git": {"sha": "abcdef1234567", "dirty": False}}))
    return {"run_id": run_id, "run_dir": d, "seed": seed, "method": method, "axes": {"method": method}}


def test_mean_std_missing_and_failed(tmp_path):
    expected = [make_run(tmp_path, "a0", "dino", 0, knn=80.0, init=70.0, wall=60),
                make_run(tmp_path, "a1", "dino", 1, knn=82.0, init=71.0, wall=120),
                make_run(tmp_path, "b0", "dino_no_centering", 0, status="failed"),
                {"run_id": "c0", "run_dir": tmp_path / "c0", "seed": 0, "method": "x", "axes": {"method": "x"}}]
    df = collect(expected)
    assert list(df["status"]) == ["completed", "completed", "failed", "missing"]
    table = summary_table(df, ["method"])
    dino = table[table["method"] == "dino"].iloc[0]
    assert dino["runs"] == "2/2"
    assert dino["k-NN top-1 (%)"] == "81.00 ± 1.41"  # std of (80, 82) with ddof=1 = sqrt(2)
    assert dino["k-NN top-1 at init (%)"] == "70.50 ± 0.71"
    assert dino["wall time (min)"] == "1.5"
    failed = table[table["method"] == "dino_no_centering"].iloc[0]
    assert failed["runs"] == "0/1" and failed["k-NN top-1 (%)"] == "—"
    text = markdown_report(df, "s", ["method"])
    assert "b0" in text and "RuntimeError: boom" in text and "| c0" in text and "missing" in text
    assert "2 of 4 runs completed" in text and "abcdef1234" in text and "k=20, T=0.07" in text


def test_single_run_has_no_std(tmp_path):
    df = collect([make_run(tmp_path, "a0", "dino", 0, knn=75.5, init=70.25)])
    row = summary_table(df, ["method"]).iloc[0]
    assert row["k-NN top-1 (%)"] == "75.50" and row["k-NN top-1 at init (%)"] == "70.25"
    assert isinstance(df, pd.DataFrame)


def test_collapse_diagnostics_and_flag_columns(tmp_path):
    runs = []
    for i, (entropy, kl, flag, step) in enumerate([(0.10, 0.30, True, 80), (0.20, 0.50, True, 120),
                                                   (4.0, 1.0, False, None)]):
        run = make_run(tmp_path, f"r{i}", "dino_no_centering" if i < 2 else "dino", i, knn=50.0 + i)
        record = json.loads((run["run_dir"] / "result.json").read_text())
        record["metrics"].update(teacher_entropy_last=entropy, kl_teacher_student_last=kl, rankme_last=3.0)
        record["collapse"] = {"collapsed": flag, "collapse_step": step, "collapse_reason": "r" if flag else None,
                              "stopped_early": None, "last": {}}
        (run["run_dir"] / "result.json").write_text(json.dumps(record))
        runs.append(run)
    table = summary_table(collect(runs), ["method"]).set_index("method")
    assert table.loc["dino_no_centering", "teacher entropy (nats)"] == "0.15 ± 0.07"
    assert table.loc["dino_no_centering", "KL(t‖s) (nats)"] == "0.40 ± 0.14"
    assert table.loc["dino_no_centering", "collapsed"] == "2/2 (step 80, 120)"
    assert table.loc["dino", "collapsed"] == "0/1"
    # metrics no run recorded (k-NN at init here) are left out rather than shown as empty columns
    assert "k-NN top-1 at init (%)" not in table.columns
    plain = summary_table(collect([make_run(tmp_path / "x", "q", "dino", 0, knn=1.0, init=2.0)]), ["method"])
    assert "KL(t‖s) (nats)" not in plain.columns and "collapsed" not in plain.columns
    assert "k-NN top-1 at init (%)" in plain.columns
