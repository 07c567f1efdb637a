"""``grid status`` rows from run directories: corrupt records and torn metric lines are said, never hidden."""

from __future__ import annotations

import json
from types import SimpleNamespace

from ssl_bench.launch.status import rows_for_table, run_state, torn_summary


def _spec(tmp_path, name="r0"):
    (tmp_path / name).mkdir()
    return SimpleNamespace(run_dir=tmp_path / name, run_id=name, axes={"method.name": "dino"}, seed=0)


def test_corrupt_result_is_reported_as_corrupt_not_missing(tmp_path):
    spec = _spec(tmp_path)
    assert run_state(spec, None, {}).state == "not submitted"  # no record yet
    (spec.run_dir / "result.json").write_text('{"status": "completed", "metr')
    row = run_state(spec, None, {})
    assert row.state == "corrupt"
    assert row.label.startswith("corrupt (result.json: not JSON: Unterminated string")
    # A local (non-SLURM) job record does not turn it into "pending" or "failed" either.
    job = {"job_id": "123", "cluster": "local"}
    assert run_state(spec, job, {}).label.startswith("corrupt (result.json: ")
    assert rows_for_table([row])[0]["state"] == row.label


def test_torn_metric_lines_are_counted(tmp_path):
    spec, other = _spec(tmp_path), _spec(tmp_path, "r1")
    (spec.run_dir / "result.json").write_text(json.dumps({"status": "running"}))
    (spec.run_dir / "metrics.jsonl").write_text('{"step": 4, "train/loss": 1.25}\n{"step": 5, "tr\n'
                                                '{"step": 6, "train/loss": 1.5}\n{"ste')
    row = run_state(spec, None, {})
    assert (row.state, row.last_step, row.last_metric, row.torn_lines) == ("running", 6, "train/loss=1.5", 2)
    assert row.label == "running (metrics.jsonl: 2 torn line(s) skipped)"
    clean = run_state(other, None, {})
    assert clean.torn_lines == 0 and clean.label == "not submitted"
    assert torn_summary([row, clean]) == "metrics.jsonl: 2 torn line(s) skipped in 1 run"
    assert torn_summary([clean]) is None


def test_select_runs_does_not_submit_a_run_whose_record_is_corrupt(tmp_path, monkeypatch):
    """A job for it would stop on the corrupt result.json: grid launch says so instead of submitting it."""
    from ssl_bench.launch import slurm, status

    corrupt, fresh = _spec(tmp_path, "bad"), _spec(tmp_path, "new")
    (corrupt.run_dir / "result.json").write_text("{")
    study = SimpleNamespace(runs=[corrupt, fresh])
    monkeypatch.setattr(status, "study_status", lambda s: [run_state(r, None, {}) for r in s.runs])
    chosen, skipped = slurm.select_runs(study)
    assert [s.run_id for s in chosen] == ["new"] and skipped["bad"].startswith("corrupt (result.json: ")
    assert [s.run_id for s in slurm.select_runs(study, force=True)[0]] == ["bad", "new"]
