"""W&B runs -> the tidy DataFrame of collect(): a fake ``wandb.Api`` at the boundary, no network.

The fake keeps to the public API surface the source uses: ``api.runs(path, filters={"group": ...})``
and runs with ``id``, ``name``, ``state``, ``config``, ``summary``, ``path``, ``group``,
``created_at`` and ``scan_history(keys=[...])`` (rows holding all the keys, only those keys).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import yaml

from ssl_bench import config as config_lib
from ssl_bench.tracking import wandb_mirror as mirror
from ssl_bench.report.collect import run_row
from ssl_bench.report.wandb_source import collect_wandb, history_wandb, status_of

SHA = "89abcdef0123456789abcdef0123456789abcdef"
ENV = {"git": {"sha": SHA, "dirty": True}, "versions": {"torch": "2.5.1"}, "world_size": 2,
       "hardware": {"cuda": False, "cpu_count": 16, "processor": "x86_64"}, "started_at": "2025-01-02T03:04:05Z"}
# What W&B itself adds to a summary: its own keys and the last value of every logged history key.
WANDB_EXTRAS = {"_timestamp": 1700000000.0, "_runtime": 12.5, "_step": 41, "_wandb": {"runtime": 12},
                "epoch": 3, "trainer/global_step": 399, "train/loss": 4.2, "collapse/teacher_entropy": 2.5,
                "knn/top1": 30.0}


class FakeRun:
    def __init__(self, run_id: str, summary: dict[str, Any], state: str = "finished", study: str = "s",
                 config: dict[str, Any] | None = None, created_at: str = "2025-01-01T00:00:00Z",
                 history: list[dict[str, Any]] | None = None, wandb_id: str | None = None):
        self.id = wandb_id or mirror.wandb_run_id(study, run_id)
        self.name, self.state, self.group, self.created_at = run_id, state, study, created_at
        self.config = config if config is not None else {
            "study": study, "seed": 3, "method": {"name": "dino", "teacher_temp": 0.04},
            "data": {"name": "fashion_mnist", "batch_size": 64}, "backbone": {"name": "vit_tiny"},
            "env": ENV, "run_id": run_id, "run_dir": f"runs/{study}/{run_id}"}
        self.summary, self.path, self.history = summary, ["team", "proj", self.id], history or []

    def scan_history(self, keys: list[str]):
        return [{k: row[k] for k in keys} for row in self.history if all(k in row for k in keys)]


class FakeApi:
    def __init__(self, runs: list[FakeRun]):
        self.all, self.calls = runs, []

    def runs(self, path: str, filters: dict[str, Any] | None = None):
        self.calls.append((path, filters))
        group = (filters or {}).get("group")
        return [r for r in self.all if group is None or r.group == group]


def summary(**extra: Any) -> dict[str, Any]:
    return {**WANDB_EXTRAS, "status": "completed", "knn_top1": 61.25, "knn_top5": 88.5,
            "timing/train_s": 3.5, "timing/train_steps": 400, "collapse/collapsed": False,
            "collapse/collapse_step": None, "collapse/rankme": 7.0, **extra}


def test_summary_becomes_the_tidy_row():
    api = FakeApi([FakeRun("dino-aaaa", summary())])
    df = collect_wandb("s", "proj", entity="team", api=api)
    assert api.calls == [("team/proj", {"group": "s"})]
    row = df.iloc[0]
    assert (row["run_id"], row["seed"], row["method"], row["status"]) == ("dino-aaaa", 3, "dino", "completed")
    assert row["knn_top1"] == 61.25 and row["knn_top5"] == 88.5
    assert row["timing.train_s"] == 3.5 and row["timing.train_steps"] == 400
    assert not row["collapse.collapsed"] and row["collapse.collapse_step"] is None
    # rankme is not one of collect.COLLAPSE_FIELDS; history keys and W&B's own keys are no metrics
    for absent in ("collapse.rankme", "epoch", "train/loss", "_runtime", "knn/top1", "trainer/global_step"):
        assert absent not in df.columns, absent
    assert row["git_sha"] == SHA and row["git_dirty"] and row["world_size"] == 2
    assert row["hardware"] == "16 CPU cores (x86_64)" and row["torch_version"] == "2.5.1"
    assert row["config.data.batch_size"] == 64 and row["config.backbone.name"] == "vit_tiny"
    assert row["config.trainer.max_steps"] is None  # absent from this config
    assert row["source"] == "wandb:team/proj/s-dino-aaaa" and row["duplicates"] == 0
    assert row["protocol"] is None and list(df.columns[:3]) == ["run_id", "seed", "method"]


@pytest.mark.parametrize("summary_status, state, status, error", [
    ("completed", "finished", "completed", None),
    ("failed", "failed", "failed", "E: boom"),
    ("preempted", "running", "running", None),  # a resumed attempt continues the W&B run
    ("completed", "running", "completed", None),
    (None, "running", "running", None),
    (None, "crashed", "failed", "W&B run crashed without the final ssl-bench record in its summary"),
    (None, "killed", "failed", "W&B run killed without the final ssl-bench record in its summary"),
    (None, "finished", "unknown", "W&B run finished without the final ssl-bench record in its summary"),
    (None, "preempted", "preempted", "W&B run preempted without the final ssl-bench record in its summary"),
])
def test_status_from_summary_then_state(summary_status, state, status, error):
    record = {} if summary_status is None else {"status": summary_status, "error": "E: boom"}
    if summary_status == "completed":
        record["error"] = None
    assert status_of(record, state) == (status, error)


def test_crashed_run_without_summary_is_a_failed_row_with_partial_metrics():
    extras = {k: v for k, v in WANDB_EXTRAS.items() if k != "epoch"}
    df = collect_wandb("s", "proj", api=FakeApi([FakeRun("dino-aaaa", {**extras, "knn_top1_init": 12.5},
                                                         state="crashed")]))
    row = df.iloc[0]
    assert row["status"] == "failed" and row["error"].startswith("W&B run crashed")
    assert row["knn_top1_init"] == 12.5 and "timing.train_s" not in df.columns


def test_expected_runs_keep_their_order_missing_ones_stay_and_extras_get_axes_from_config():
    other = FakeRun("dino-cccc", summary(knn_top1=40.0), config={
        "seed": 1, "method": {"name": "dino", "teacher_temp": 0.08}, "env": {}, "run_id": "dino-cccc"})
    api = FakeApi([other, FakeRun("dino-aaaa", summary()),
                   FakeRun("dino-zzzz", summary(), study="another")])  # another group: not asked for
    expected = [{"run_id": "dino-bbbb", "run_dir": "runs/s/dino-bbbb", "seed": 0, "method": "dino",
                 "axes": {"method": "dino", "method.teacher_temp": 0.06}},
                {"run_id": "dino-aaaa", "run_dir": "runs/s/dino-aaaa", "seed": 3, "method": "dino",
                 "axes": {"method": "dino", "method.teacher_temp": 0.04}}]
    df = collect_wandb("s", "proj", api=api, expected=expected)
    assert list(df["run_id"]) == ["dino-bbbb", "dino-aaaa", "dino-cccc"]
    assert list(df["status"]) == ["missing", "completed", "completed"]
    assert list(df["method.teacher_temp"]) == [0.06, 0.04, 0.08] and list(df["seed"]) == [0, 3, 1]
    missing = df.iloc[0]
    assert pd.isna(missing["knn_top1"]) and pd.isna(missing["source"]) and missing["duplicates"] == 0
    assert df.iloc[2]["knn_top1"] == 40.0 and api.calls == [("proj", {"group": "s"})]


def test_duplicate_run_ids_keep_the_most_recent():
    old = FakeRun("dino-aaaa", summary(knn_top1=10.0, _timestamp=1700000000.0), wandb_id="old1")
    new = FakeRun("dino-aaaa", summary(knn_top1=20.0, _timestamp=1700000500.0), wandb_id="new1")
    df = collect_wandb("s", "proj", api=FakeApi([new, old]))
    assert len(df) == 1 and df.iloc[0]["knn_top1"] == 20.0 and df.iloc[0]["duplicates"] == 1
    assert df.iloc[0]["source"] == "wandb:team/proj/new1"
    # without a summary timestamp (crashed before logging), W&B's created_at decides
    bare = {"status": "completed"}
    runs = [FakeRun("dino-aaaa", {**bare, "knn_top1": 1.0}, created_at="2025-03-01T10:00:00Z", wandb_id="a"),
            FakeRun("dino-aaaa", {**bare, "knn_top1": 2.0}, created_at="2025-03-02T09:00:00Z", wandb_id="b"),
            FakeRun("dino-aaaa", {**bare, "knn_top1": 3.0}, created_at="2025-02-28T23:00:00Z", wandb_id="c")]
    df = collect_wandb("s", "proj", api=FakeApi(runs))
    assert df.iloc[0]["knn_top1"] == 2.0 and df.iloc[0]["duplicates"] == 2


def test_empty_group_names_project_group_and_run_count():
    api = FakeApi([FakeRun("dino-aaaa", summary(), study="teacher_temp"),
                   FakeRun("dino-bbbb", summary(), study="teacher_temp")])
    with pytest.raises(config_lib.ConfigError) as info:
        collect_wandb("teacher_tmp", "proj", entity="team", api=api)
    message = str(info.value)
    assert "'team/proj'" in message and "'teacher_tmp'" in message and "has 2 run(s)" in message
    with pytest.raises(config_lib.ConfigError, match="group 'teacher_tmp'"):
        history_wandb("teacher_tmp", "proj", api=api)


def test_round_trip_result_json_to_wandb_to_row_matches_run_row(tmp_path, monkeypatch):
    """The real mirror's config and summary give the row collect.run_row builds from the run directory."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # scrub_secrets would mask strings containing it
    cfg = config_lib.build_config({"study": "tt", "seed": 2, "data": {"batch_size": 32}, "trainer": {"max_steps": 50}})
    rid = config_lib.run_id(cfg)
    result = {"run_id": rid, "study": "tt", "method": cfg.method.name, "seed": 2, "status": "completed",
              "metrics": {"knn_top1": 55.5, "knn_top5": 81.0, "train_loss_last": 3.25},
              "timing": {"train_s": 12.0, "wall_s": 20.5, "train_steps": 50},
              "collapse": {"collapsed": True, "collapse_step": 30, "collapse_reason": "entropy",
                           "stopped_early": None, "last": {"teacher_entropy": 0.01}},
              "protocol": {"knn": {"k": 20, "temperature": 0.07}}}
    directory = tmp_path / "runs" / "tt" / rid
    config = mirror.run_config(cfg, rid, directory, ENV)
    run = FakeRun(rid, {**WANDB_EXTRAS, **mirror.summary_of(result)}, study="tt", config=config)
    info = {"run_id": rid, "run_dir": directory, "seed": 2, "method": cfg.method.name,
            "axes": {"method": cfg.method.name}}
    wandb_df = collect_wandb("tt", "proj", api=FakeApi([run]), expected=[info])
    dir_row = run_row(info, result, ENV, yaml.safe_load(config_lib.to_yaml(cfg)), source=str(directory))
    differ = ["source", "protocol"]  # the protocol is nested, so W&B does not hold it
    pd.testing.assert_frame_equal(wandb_df.drop(columns=[*differ, "duplicates"]),
                                  pd.DataFrame([dir_row]).drop(columns=differ), check_like=True)
    assert wandb_df.iloc[0]["config.trainer.max_steps"] == 50 and wandb_df.iloc[0]["collapse.collapse_step"] == 30
    assert wandb_df.iloc[0]["source"] == f"wandb:team/proj/tt-{rid}"


def test_history_long_table_by_lightning_global_step():
    # Lightning logs trainer/global_step with each metric; _step counts log calls. A resumed attempt
    # logs step 20 again: the later value stands.
    hist = [{"_step": 0, "trainer/global_step": 0, "train/loss": 5.0},
            {"_step": 1, "trainer/global_step": 10, "collapse/teacher_entropy": 4.0, "collapse/kl_teacher_student": 0.5},
            {"_step": 2, "trainer/global_step": 20, "collapse/teacher_entropy": 3.0, "collapse/kl_teacher_student": 0.4},
            {"_step": 3, "trainer/global_step": 20, "collapse/teacher_entropy": 2.5},
            {"_step": 4, "trainer/global_step": 30, "collapse/kl_teacher_student": 0.2}]
    runs = [FakeRun("dino-aaaa", summary(), history=hist),
            FakeRun("dino-bbbb", summary(), history=[{"_step": 7, "collapse/teacher_entropy": 1.5}]),
            FakeRun("dino-cccc", summary(), history=[{"_step": 0, "train/loss": 1.0}])]
    curves = history_wandb("s", "proj", api=FakeApi(runs))
    assert list(curves.columns) == ["run_id", "seed", "method", "step", "collapse/teacher_entropy",
                                    "collapse/kl_teacher_student"]
    a = curves[curves["run_id"] == "dino-aaaa"].set_index("step")
    assert list(a.index) == [10, 20, 30]
    assert a.loc[20, "collapse/teacher_entropy"] == 2.5 and a.loc[20, "collapse/kl_teacher_student"] == 0.4
    assert pd.isna(a.loc[30, "collapse/teacher_entropy"]) and a.loc[30, "collapse/kl_teacher_student"] == 0.2
    b = curves[curves["run_id"] == "dino-bbbb"]  # no trainer/global_step logged: W&B's _step
    assert list(b["step"]) == [7] and list(b["collapse/teacher_entropy"]) == [1.5]
    assert "dino-cccc" not in set(curves["run_id"]) and set(curves["seed"]) == {3}


def test_history_uses_expected_axes():
    hist = [{"trainer/global_step": 5, "collapse/teacher_entropy": 2.0}]
    expected = [{"run_id": "dino-aaaa", "seed": 9, "method": "dino", "axes": {"method.teacher_temp": 0.04}},
                {"run_id": "dino-bbbb", "seed": 0, "method": "dino", "axes": {"method.teacher_temp": 0.06}}]
    curves = history_wandb("s", "proj", api=FakeApi([FakeRun("dino-aaaa", summary(), history=hist)]),
                           keys=["collapse/teacher_entropy"], expected=expected)
    assert curves.to_dict("records") == [{"run_id": "dino-aaaa", "seed": 9, "method.teacher_temp": 0.04,
                                          "step": 5, "collapse/teacher_entropy": 2.0}]


def test_results_table_from_wandb_on_the_command_line(tmp_path, tiny_tree, monkeypatch, capsys):
    """`ssl-bench results table STUDY --from wandb`: wandb.Api replaced at the boundary; a run W&B lacks stays."""
    import wandb

    from ssl_bench.cli import main
    from ssl_bench.launch.grid import load_study

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study_file = tmp_path / "wb.yaml"
    study_file.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"method.name": ["dino", "dino_sinkhorn"]},
                                          "seeds": [0]}))
    specs = {s.method: s for s in load_study(study_file).runs}
    api = FakeApi([FakeRun(specs["dino"].run_id, summary(knn_top1=61.25), study="wb")])
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: api)
    assert main(["results", "table", str(study_file), "--from", "wandb", "--project", "proj", "--entity", "team",
                 "--cols", "knn_top1"]) == 0
    out = capsys.readouterr().out
    assert api.calls == [("team/proj", {"group": "wb"})]
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| dino")}
    assert "61.25" in lines["dino"] and "1 missing" in lines["dino_sinkhorn"]
