"""Honest run status: a record that says running while its owner is gone is ``lost``, never ``running``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from ssl_bench import repro, tracking
from ssl_bench.run import callbacks
from ssl_bench.launch import slurm, status
from ssl_bench.launch.status import ACTIVE, LOST, resumes_label, run_state

HOST = socket.gethostname()


def _stamp(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def _spec(tmp_path, record: dict | None, name: str = "r0"):
    (tmp_path / name).mkdir()
    if record is not None:
        (tmp_path / name / "result.json").write_text(json.dumps(record))
    return SimpleNamespace(run_dir=tmp_path / name, run_id=name, axes={"method.name": "dino"}, seed=0)


def _running(**owner) -> dict:
    return {"status": "running", "owner": {**repro.owner(), **owner}}


def _dead_pid() -> int:
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    assert not repro.pid_alive(child.pid)
    return child.pid


def test_dead_pid_on_this_host_is_lost(tmp_path):
    pid = _dead_pid()
    row = run_state(_spec(tmp_path, _running(pid=pid)), None, {})
    assert row.state == "lost" and row.label == f"lost (process {pid} on {HOST} is gone)"
    # A local (submitit local / debug) job record does not make it pending or running either.
    local = run_state(_spec(tmp_path, _running(pid=pid), "r1"), {"job_id": "7", "cluster": "local"}, {})
    assert local.state == "lost"


def test_this_process_is_running(tmp_path):
    row = run_state(_spec(tmp_path, _running()), None, {})
    assert (row.state, row.label) == ("running", "running")


def test_a_reused_pid_is_another_process(tmp_path):
    """This process is alive, but it started long after the owner recorded its start: not the owner."""
    began = repro.process_start_time(os.getpid())
    if began is None:
        pytest.skip("no /proc start times here")
    row = run_state(_spec(tmp_path, _running(started_at=_stamp(time.time() - began + 3600))), None, {})
    assert row.label == f"lost (pid {os.getpid()} on {HOST} is another process now)"


def test_other_host_is_judged_by_its_heartbeat(tmp_path):
    fresh = run_state(_spec(tmp_path, _running(host="elsewhere", heartbeat_at=_stamp(150))), None, {})
    assert fresh.label == "running (heartbeat 2 min ago)"
    stale = run_state(_spec(tmp_path, _running(host="elsewhere", heartbeat_at=_stamp(45 * 60 + 5)), "r1"), None, {})
    assert stale.label == "lost (no heartbeat for 45 min)"
    assert tracking.LOST_AFTER_S == 30 * 60


def test_record_without_owner_stays_running(tmp_path):
    """Records written before owners existed cannot be judged: shown as they say."""
    assert run_state(_spec(tmp_path, {"status": "running"}), None, {}).label == "running"


@pytest.mark.parametrize("slurm_state", ["COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"])
def test_ended_slurm_job_with_running_record_is_lost(tmp_path, slurm_state):
    job = {"job_id": "41_3", "cluster": "slurm"}
    row = run_state(_spec(tmp_path, _running(host="node7", slurm_job_id="45")), job,
                    {"41_3": {"state": slurm_state, "nodes": "node7"}})
    assert row.state == "lost" and row.label == f"lost (SLURM {slurm_state}, run record says running)"


def test_live_slurm_job_vouches_for_its_run(tmp_path):
    """squeue says RUNNING: running, whatever the owner's pid or heartbeat (it may be on another node)."""
    job = {"job_id": "41_3", "cluster": "slurm"}
    record = _running(pid=_dead_pid(), heartbeat_at=_stamp(3 * 3600))
    row = run_state(_spec(tmp_path, record), job, {"41_3": {"state": "RUNNING", "nodes": "node7"}})
    assert row.label == "running"
    # squeue/sacct unavailable: back to the owner.
    assert run_state(_spec(tmp_path, record, "r1"), job, {}).state == "lost"


def test_failed_slurm_job_with_failed_record_stays_failed(tmp_path):
    job = {"job_id": "9", "cluster": "slurm"}
    row = run_state(_spec(tmp_path, {"status": "failed", "error": "boom"}), job, {"9": {"state": "FAILED"}})
    assert row.state == "failed" and row.label == "failed (boom; SLURM FAILED, run record says failed)"


def test_lost_is_not_active_and_is_resubmitted(tmp_path, monkeypatch):
    assert LOST not in ACTIVE
    lost = _spec(tmp_path, _running(pid=_dead_pid()), "lost")
    alive = _spec(tmp_path, _running(), "alive")
    study = SimpleNamespace(runs=[lost, alive])
    monkeypatch.setattr(status, "study_status",
                        lambda s: [run_state(r, {"job_id": "5", "cluster": "slurm"}, {}) for r in s.runs])
    chosen, skipped = slurm.select_runs(study)
    assert [s.run_id for s in chosen] == ["lost"] and skipped == {"alive": "already running as job 5"}


def test_resume_reasons_in_the_label(tmp_path):
    record = {"status": "completed", "resumes": [{"reason": "preempted"}, {"reason": "lost"}]}
    assert run_state(_spec(tmp_path, record), None, {}).label == "completed (resumed 2x (1 preempted, 1 lost))"
    assert resumes_label(2, ["preempted", "preempted"]) == "resumed 2x after preemption"
    assert resumes_label(3, ["failed", "lost", "lost"]) == "resumed 3x (2 lost, 1 failed)"
    assert resumes_label(1, [""]) == "resumed 1x (1 reason not recorded)"  # records of older versions
    assert resumes_label(0, []) == ""


def test_heartbeat_beats_only_after_its_interval():
    now, beats = [1000.0], []
    beat = callbacks.Heartbeat(lambda: beats.append(now[0]), every_s=60, clock=lambda: now[0])
    trainer = SimpleNamespace(is_global_zero=True)
    for t in (1001.0, 1059.0, 1060.0, 1061.0, 1119.0, 1125.0):
        now[0] = t
        beat.on_train_batch_end(trainer, None, None, None, 0)
    assert beats == [1060.0, 1125.0]
    other_rank = callbacks.Heartbeat(lambda: beats.append(-1.0), every_s=60, clock=lambda: now[0])
    now[0] += 600
    other_rank.on_train_batch_end(SimpleNamespace(is_global_zero=False), None, None, None, 0)
    assert beats == [1060.0, 1125.0]


def test_heartbeat_survives_a_failed_write(capsys):
    now = [0.0]

    def broken() -> None:
        raise OSError("disk full")

    beat = callbacks.Heartbeat(broken, every_s=1, clock=lambda: now[0])
    now[0] = 5.0
    beat.on_train_batch_end(SimpleNamespace(is_global_zero=True), None, None, None, 0)
    assert "heartbeat not written: disk full" in capsys.readouterr().out


def test_tiny_run_records_its_owner(tiny_tree, monkeypatch):
    """A real 2-step run: result.json names this host and process, SLURM ids from the environment."""
    from ssl_bench import config as config_lib
    from ssl_bench.run import train

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    beats: list[str] = []
    original = callbacks.Heartbeat.__init__
    # Beat at every batch, so the run writes heartbeats through the callable the run gives the callback.
    monkeypatch.setattr(callbacks.Heartbeat, "__init__",
                        lambda self, beat, every_s=60.0, clock=time.monotonic:
                        original(self, lambda: (beat(), beats.append("x")), -1.0, clock))
    result = train.run(config_lib.build_config(tiny_tree))
    record = tracking.read_result(result.run_dir)
    owner = record["owner"]
    assert record["status"] == "completed" and len(beats) == 2
    assert (owner["host"], owner["pid"]) == (HOST, os.getpid())
    assert owner["slurm_job_id"] is owner["slurm_array_job_id"] is owner["slurm_array_task_id"] is None
    started, beat = (datetime.fromisoformat(owner[k]) for k in ("started_at", "heartbeat_at"))
    assert started.tzinfo is not None and started <= beat <= datetime.now(timezone.utc)


def test_grid_plan_shows_a_lost_run_as_lost(tmp_path):
    """grid plan's status column judges the owner too: a dead pid on this host is lost, never running."""
    import json
    import socket
    import subprocess
    from types import SimpleNamespace

    from ssl_bench.cli.grid import plan_rows

    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    run_dir = tmp_path / "r0"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"status": "running", "owner": {
        "host": socket.gethostname(), "pid": child.pid, "started_at": "2026-01-01T00:00:00+00:00"}}))
    spec = SimpleNamespace(run_id="r0", method="dino", axes=[], seed=0, run_dir=run_dir)
    (row,) = plan_rows(SimpleNamespace(runs=[spec]))
    assert row["status"] == f"lost (process {child.pid} on {socket.gethostname()} is gone)"
