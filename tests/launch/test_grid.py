"""Study expansion, validation before launch, run-id stability and skip-completed relaunch."""

import json
import shutil

import pytest
import yaml

from ssl_bench import config as config_lib
from ssl_bench.launch.grid import load_study, validate
from ssl_bench.launch.local import launch_local


def write_study(tmp_path, tiny_tree, grid, seeds=(0,), extra=None):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study = {"study": "s", "base": "base.yaml", "grid": grid, "seeds": list(seeds), **(extra or {})}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_cartesian_expansion_and_stable_ids(tmp_path, tiny_tree):
    path = write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dino_no_centering"],
                                             "method.center_momentum": [0.9, 0.99]}, seeds=[0, 1, 2])
    study = load_study(path)
    assert study.name == "s" and len(study.runs) == 2 * 2 * 3
    assert len({r.run_id for r in study.runs}) == 12
    assert [r.run_id for r in load_study(path).runs] == [r.run_id for r in study.runs]
    first = study.runs[0]
    assert dict(first.axes) == {"method.name": "dino", "method.center_momentum": 0.9} and first.seed == 0
    assert first.config.method.center_momentum == 0.9 and first.config.study == "s"
    # the same config launched by `ssl-bench train` gets the same id
    assert first.run_id == config_lib.run_id(config_lib.build_config(tiny_tree, {"seed": 0}))


def test_study_errors_name_the_key(tmp_path, tiny_tree):
    with pytest.raises(config_lib.ConfigError, match="'gird'.*valid study keys"):
        load_study(write_study(tmp_path, tiny_tree, {}, extra={"gird": {}}))
    with pytest.raises(config_lib.ConfigError, match="method.nmae"):
        load_study(write_study(tmp_path, tiny_tree, {"method.nmae": ["dino"]}))
    with pytest.raises(config_lib.ConfigError, match="same config"):
        load_study(write_study(tmp_path, tiny_tree, {"tracking.log_every_n_steps": [1, 2]}))


def test_validate_rejects_unknown_method_before_any_run(tmp_path, tiny_tree):
    study = load_study(write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dnio"]}))
    with pytest.raises(config_lib.ConfigError) as err:
        validate(study)
    assert "dnio" in str(err.value) and "did you mean 'dino'" in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_launch_skips_completed_and_reruns_failed(tmp_path, tiny_tree):
    study = load_study(write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dino_no_sharpening"]}))
    validate(study)
    first = launch_local(study)
    assert first.ok and len(first.completed) == 2
    done, other = study.runs
    mtime = (done.run_dir / "result.json").stat().st_mtime_ns
    # mark the second run as failed without a checkpoint to resume from: the next launch reruns it
    # from scratch and keeps the failed attempt (with a checkpoint it would resume: tests/test_resume.py)
    failed = json.loads((other.run_dir / "result.json").read_text())
    failed["status"] = "failed"
    (other.run_dir / "result.json").write_text(json.dumps(failed))
    shutil.rmtree(other.run_dir / "checkpoints")
    second = launch_local(study)
    assert second.skipped == [done.run_id] and second.completed == [other.run_id]
    assert (done.run_dir / "result.json").stat().st_mtime_ns == mtime
    archived = json.loads((other.run_dir / "attempts" / "1" / "result.json").read_text())
    assert archived["status"] == "failed"
    assert json.loads((other.run_dir / "result.json").read_text())["status"] == "completed"


def test_failed_run_is_recorded_and_next_run_still_starts(tmp_path, tiny_tree, monkeypatch):
    study = load_study(write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dino_no_centering"]}))
    from ssl_bench.methods import dino

    original = dino.DINO.training_step

    def boom(self, batch, idx):
        if self.cfg.method.name == "dino":
            raise RuntimeError("injected failure")
        return original(self, batch, idx)

    monkeypatch.setattr(dino.DINO, "training_step", boom)
    summary = launch_local(study)
    assert list(summary.failed) == [study.runs[0].run_id] and summary.completed == [study.runs[1].run_id]
    record = json.loads((study.runs[0].run_dir / "result.json").read_text())
    assert record["status"] == "failed" and "injected failure" in record["error"]


def test_sigterm_stops_the_study_and_the_same_command_resumes(tmp_path, tiny_tree, monkeypatch):
    """A SIGTERM to a local study (kill, timeout) stops it, as Ctrl-C does, instead of starting the next run."""
    import os
    import signal

    from ssl_bench.methods import dino

    resumable = {"optim": {"epochs": 2}, "trainer": {"max_steps": -1}, "train": {"checkpoint_every_n_steps": 3},
                 "eval": {"knn_init": False}}  # 8 steps, as in tests/test_resume.py
    study = load_study(write_study(tmp_path, config_lib.deep_merge(tiny_tree, resumable),
                                   {"method.name": ["dino", "dino_no_centering"]}))
    first, second = study.runs
    original = dino.DINO.training_step

    def training_step(self, batch, idx):
        if self.cfg.method.name == "dino" and self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets trainer.received_sigterm
        return original(self, batch, idx)

    with monkeypatch.context() as patch:
        patch.setattr(dino.DINO, "training_step", training_step)
        summary = launch_local(study)
    assert not summary.ok and summary.not_started == [second.run_id] and summary.completed == []
    assert "checkpoint saved at step 3" in summary.failed[first.run_id] and "SIGTERM" in summary.stopped
    assert json.loads((first.run_dir / "result.json").read_text())["status"] == "preempted"
    assert not second.run_dir.exists()
    again = launch_local(study)
    assert again.ok and again.completed == [first.run_id, second.run_id]
    assert json.loads((first.run_dir / "result.json").read_text())["resumes"][0]["from_step"] == 3


# ---- malformed study files (issue 16) ------------------------------------------------------------


def write_text_study(tmp_path, tiny_tree, text, name="study.yaml"):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, fragment", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- base: base.yaml\n", "at the top level, got a list"),
    ("base: base.yaml\nconfig: [1, 2]\n", "'config' must be a mapping of config keys"),
    ("base: [a, b]\n", "'base' must be the path of one config file"),
    ("base: nope.yaml\n", "'base' names 'nope.yaml'"),
    ("base: base.yaml\ngrid: [1, 2]\n", "'grid' must map dotted keys to lists of values"),
    ("base: base.yaml\ngrid:\n  seed: [1]\n  seed: [2]\n", "line 4: duplicate key 'seed'"),
    ("base: base.yaml\nconfig: {study: x}\n", "'config' may not set 'study'"),
    ("base: base.yaml\ngrid: {study: [a, b]}\n", "'study' cannot be a grid axis"),
    ("study: ../up\nbase: base.yaml\n", "study name '../up'"),
    ("study: 7\nbase: base.yaml\n", "study name 7"),
])
def test_malformed_study_is_a_config_error(tmp_path, tiny_tree, text, fragment):
    path = write_text_study(tmp_path, tiny_tree, text)
    with pytest.raises(config_lib.ConfigError) as info:
        load_study(path)
    assert fragment in str(info.value) and "study" in str(info.value)


def test_study_name_from_unsafe_file_stem_is_refused(tmp_path, tiny_tree):
    path = write_text_study(tmp_path, tiny_tree, "base: base.yaml\n", name="my study.yaml")
    with pytest.raises(config_lib.ConfigError, match="study name 'my study' .*file name"):
        load_study(path)
    assert load_study(write_text_study(tmp_path, tiny_tree, "base: base.yaml\nstudy: ok\n",
                                       name="my study.yaml")).name == "ok"


def test_study_override_is_refused_other_overrides_apply(tmp_path, tiny_tree):
    path = write_study(tmp_path, tiny_tree, {})
    with pytest.raises(config_lib.ConfigError, match="study name comes from the study file"):
        load_study(path, ["study=other"])
    with pytest.raises(config_lib.ConfigError, match="study name comes from the study file"):
        load_study(path, ["study=../../x"])
    assert load_study(path, ["optim.epochs=3"]).runs[0].config.optim.epochs == 3


def test_every_problem_of_every_run_is_reported_at_once(tmp_path):
    """One message, one line per distinct problem, naming the run unless every run has it."""
    (tmp_path / "base.yaml").write_text("data: {name: synthetic}\n")
    study = tmp_path / "s.yaml"
    study.write_text("base: base.yaml\ngrid:\n  optim.lr: [-1.0, 0.001, -0.001]\n  method.student_temp: [0.0]\n")
    with pytest.raises(config_lib.ConfigError) as info:
        load_study(study)
    lines = str(info.value).splitlines()
    assert lines[0] == "method.student_temp=0.0: must be > 0"  # every run: said once, no run named
    assert lines[1:] == ["optim.lr=-1.0: must be > 0 (run optim.lr=-1.0, method.student_temp=0.0, seed=0)",
                         "optim.lr=-0.001: must be > 0 (run optim.lr=-0.001, method.student_temp=0.0, seed=0)"]
