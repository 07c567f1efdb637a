"""Named arms in study files: keys that vary together, the `arm` axis, errors, and the paper tables as one file."""

from pathlib import Path

import pytest
import yaml

from ssl_bench import config as config_lib
from ssl_bench.cli.results import expected_runs
from ssl_bench.config.schema import to_dict
from ssl_bench.launch.grid import load_study

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, tiny_tree, arms, grid=None, seeds=(0,)):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study = {"study": "s", "base": "base.yaml", "arms": arms, "seeds": list(seeds)}
    if grid is not None:
        study["grid"] = grid
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_arms_set_several_keys_together_and_multiply_the_grid(tmp_path, tiny_tree):
    arms = [{"name": "plain", "method.name": "dino"},
            {"name": "warm", "method.name": "dino_no_centering", "method.teacher_temp": 0.07,
             "method.warmup_teacher_temp_epochs": 1}]
    study = load_study(write(tmp_path, tiny_tree, arms, grid={"optim.lr": [0.001, 0.002]}, seeds=(0, 1)))
    assert study.axes == {"arm": ["plain", "warm"], "optim.lr": [0.001, 0.002]}
    assert len(study.runs) == 8 and len({r.run_id for r in study.runs}) == 8
    first = study.runs[0]
    assert first.axes == (("arm", "plain"), ("optim.lr", 0.001)) and first.seed == 0
    warm = [r for r in study.runs if dict(r.axes)["arm"] == "warm"]
    assert {r.config.method.name for r in warm} == {"dino_no_centering"}
    assert {(r.config.method.teacher_temp, r.config.method.warmup_teacher_temp_epochs) for r in warm} == {(0.07, 1)}
    assert {r.config.optim.lr for r in warm} == {0.001, 0.002}  # the grid point applies on top of the arm
    plain = [r for r in study.runs if dict(r.axes)["arm"] == "plain"]
    assert {r.config.method.teacher_temp for r in plain} == {tiny_tree.get("method", {}).get(
        "teacher_temp", config_lib.Config().method.teacher_temp)}


def test_the_arm_name_is_not_in_the_run_id(tmp_path, tiny_tree):
    """The same config through an arm or through a grid axis is the same run."""
    by_arm = load_study(write(tmp_path, tiny_tree, [{"name": "x", "method.name": "dino_no_sharpening"}]))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(
        {"study": "s", "base": "base.yaml", "grid": {"method.name": ["dino_no_sharpening"]}}))
    by_grid = load_study(tmp_path / "grid.yaml")
    assert [r.run_id for r in by_arm.runs] == [r.run_id for r in by_grid.runs]


def test_results_tables_group_by_arm(tmp_path, tiny_tree):
    study = load_study(write(tmp_path, tiny_tree, [{"name": "a", "method.name": "dino"},
                                                   {"name": "b", "method.name": "dino_sinkhorn"}]))
    expected, rows = expected_runs(study)
    assert rows == ["arm"]
    assert [(e["axes"]["arm"], e["axes"]["method"]) for e in expected] == [("a", "dino"), ("b", "dino_sinkhorn")]


@pytest.mark.parametrize("arms, grid, fragment", [
    ({"name": "a"}, None, "'arms' must be a non-empty list of mappings"),
    ([], None, "'arms' must be a non-empty list of mappings"),
    (["dino"], None, "arm 0 must be a mapping with a non-empty string 'name'"),
    ([{"method.name": "dino"}], None, "arm 0 must be a mapping with a non-empty string 'name'"),
    ([{"name": "a"}, {"name": "a", "method.name": "dino_sinkhorn"}], None, "arm name 'a' is given twice"),
    ([{"name": "a", "method.nmae": "dino"}], None, "nmae"),
    ([{"name": "a", "seed": 3}], None, "arm 'a' may not set 'seed'"),
    ([{"name": "a", "study": "t"}], None, "arm 'a' may not set 'study'"),
    ([{"name": "a", "optim.lr": 0.1}], {"optim.lr": [0.2]}, "arm 'a' sets 'optim.lr', which is also a grid axis"),
    ([{"name": "a"}, {"name": "b"}], None, "resolve to the same config"),
])
def test_bad_arms_are_config_errors_that_name_the_arm(tmp_path, tiny_tree, arms, grid, fragment):
    with pytest.raises(config_lib.ConfigError) as info:
        load_study(write(tmp_path, tiny_tree, arms, grid))
    assert fragment in str(info.value) and "study.yaml" in str(info.value)


def _configs(path):
    """run id -> resolved config without the study name (unhashed: it only names the run directory)."""
    out = {}
    for run in load_study(REPO / path).runs:
        tree = to_dict(run.config)
        tree.pop("study")
        out[run.run_id] = tree
    return out


@pytest.mark.parametrize("one_file, older_files", [
    ("experiments/recipes/dino_table7.yaml",
     ["experiments/recipes/dino_table7_ablation.yaml", "experiments/recipes/dino_table7_no_multicrop.yaml"]),
    ("experiments/recipes/dino_teacher_temp_table.yaml",
     ["experiments/recipes/dino_teacher_temp.yaml", "experiments/recipes/dino_teacher_temp_warmup.yaml"]),
])
def test_a_paper_table_is_one_study_with_the_runs_of_the_older_files(one_file, older_files):
    arms = _configs(one_file)
    older = {}
    for path in older_files:
        older.update(_configs(path))
    if "table7" in one_file:  # Table 7's no-multi-crop row is the authors' (0.14, 1) run, not the (0.4, 1) one
        older.pop("dino_no_multicrop-23a1d881")
    assert arms == older


def test_grid_plan_shows_the_arm_names():
    study = load_study(REPO / "experiments/recipes/dino_table7.yaml")
    assert [(dict(r.axes)["arm"], r.method) for r in study.runs] == [
        ("full", "dino"), ("no_momentum", "dino_no_momentum"), ("sinkhorn", "dino_sinkhorn"),
        ("no_multicrop", "dino_no_multicrop")]
    no_multicrop = study.runs[-1].config.data
    assert (no_multicrop.local_crops_number, list(no_multicrop.global_crop_scale)) == (0, [0.14, 1.0])
