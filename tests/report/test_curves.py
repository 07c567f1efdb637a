"""Curves from metrics.jsonl: seed means per arm at the chosen steps; torn lines are skipped."""

import json

from ssl_bench.report.curves import collect_curves, curve_table, markdown_curves


def _run(root, run_id, method, seed, values, torn=False):
    d = root / run_id
    d.mkdir(parents=True)
    lines = [json.dumps({"step": s, "collapse/teacher_entropy": v}) for s, v in values]
    lines.insert(1, json.dumps({"step": 0, "train/loss": 1.0}))  # other metrics on their own lines
    text = "\n".join(lines) + "\n" + ('{"step": 99, "collapse/teach' if torn else "")
    (d / "metrics.jsonl").write_text(text)
    return {"run_id": run_id, "run_dir": d, "seed": seed, "axes": {"method": method}}


def test_seed_means_at_every_nth_and_last_step(tmp_path):
    runs = [_run(tmp_path, "a0", "dino", 0, [(0, 1.0), (10, 2.0), (20, 3.0), (25, 4.0)]),
            _run(tmp_path, "a1", "dino", 1, [(0, 3.0), (10, 4.0), (20, 5.0), (25, 6.0)], torn=True),
            _run(tmp_path, "b0", "dino_no_centering", 0, [(0, 1.0), (10, 0.5), (20, 0.1), (25, 0.0)])]
    curves = collect_curves(runs + [{"run_id": "x", "run_dir": tmp_path / "x", "seed": 0, "axes": {"method": "x"}}],
                            ["collapse/teacher_entropy"])
    assert len(curves) == 12 and 99 not in set(curves["step"])
    table = curve_table(curves, ["method"], "collapse/teacher_entropy", every=20)
    assert list(table.index) == [0, 20, 25] and list(table.columns) == ["dino", "dino_no_centering"]
    assert table.loc[20, "dino"] == 4.0 and table.loc[25, "dino_no_centering"] == 0.0
    text = markdown_curves(curves, ["method"], ["collapse/teacher_entropy", "collapse/rankme"], every=20)
    assert "mean over 1–2 seeds" in text and "no run logged `collapse/rankme`" in text
    assert curves.attrs["torn_lines"] == {"a1": 1}
    assert text.rstrip().endswith("- metrics.jsonl: 1 torn line(s) skipped in 1 run")


def test_curves_without_torn_lines_say_nothing_about_them(tmp_path):
    curves = collect_curves([_run(tmp_path, "a0", "dino", 0, [(0, 1.0), (10, 2.0)])], ["collapse/teacher_entropy"])
    assert curves.attrs["torn_lines"] == {}
    assert "torn" not in markdown_curves(curves, ["method"], ["collapse/teacher_entropy"], every=10)


def test_knn_curve_gets_init_and_final_points():
    import pandas as pd

    from ssl_bench.report.curves import with_knn_endpoints

    curves = pd.DataFrame([{"run_id": "r0", "seed": 0, "method": "dino", "step": 750, "knn/top1": 60.0}])
    runs = pd.DataFrame([{"run_id": "r0", "seed": 0, "method": "dino", "status": "completed", "knn_top1_init": 55.0,
                          "knn_top1": 65.0, "timing.train_steps": 1500},
                         {"run_id": "r1", "seed": 1, "method": "dino", "status": "failed", "knn_top1_init": 54.0,
                          "knn_top1": None, "timing.train_steps": None}])
    out = with_knn_endpoints(curves, runs, ["method"])
    assert list(zip(out["step"], out["knn/top1"])) == [(0, 55.0), (750, 60.0), (1500, 65.0)]
