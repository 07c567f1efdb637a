"""Config loading, overrides, errors that name keys, and run-id stability."""

from pathlib import Path

import pytest

from ssl_bench import config as config_lib
from ssl_bench.config import ConfigError, build_config, load_config, parse_overrides


def test_defaults_are_the_embedded_fashion_mnist_setup():
    cfg = build_config()
    assert cfg.data.name == "fashion_mnist" and cfg.trainer.accelerator == "cpu"
    assert cfg.method.student_temp == 0.1 and cfg.method.center_momentum == 0.9
    assert cfg.eval.knn_k == [10, 20, 100, 200] and cfg.eval.knn_temperature == 0.07


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.epochs=2", "data.subset=5000", "data.root=null", "eval.knn_k=[10,20]"])
    assert cfg.optim.epochs == 2 and cfg.data.subset == 5000 and cfg.data.root is None
    assert cfg.eval.knn_k == [10, 20]


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.epochz=2"])
    msg = str(err.value)
    assert "'optim.epochz'" in msg and "did you mean 'optim.epochs'" in msg and "optim.warmup_epochs" in msg


def test_unknown_top_level_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "'optimizer'" in str(err.value) and "optim" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.epochs=many"])
    assert "optim.epochs" in str(err.value)


def test_bad_values_are_rejected():
    for override, key in (("tracking.wandb=cloud", "tracking.wandb"), ("data.batch_size=0", "data.batch_size"),
                          ("eval.knn_report_k=7", "eval.knn_report_k"), ("data.subset=0", "data.subset"),
                          ("data.local_crop_scale=[0.5,0.1]", "data.local_crop_scale")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.epochs"])


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  epochs: 7\n  lr: 0.001\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "b.yaml", ["optim.lr=0.002"])
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 0.002
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_run_id_is_stable_and_ignores_bookkeeping():
    a = load_config(None, ["optim.epochs=2"])
    b = load_config(None, ["optim.epochs=2", "tracking.runs_root=/elsewhere", "data.num_workers=7", "study=other"])
    assert config_lib.run_id(a) == config_lib.run_id(b)
    assert config_lib.run_id(a) != config_lib.run_id(load_config(None, ["optim.epochs=2", "seed=1"]))
    assert config_lib.run_id(a).startswith("dino-") and len(config_lib.config_hash(a)) == 8


def test_run_id_is_pinned():
    """The hash of the defaults is pinned: if this changes, every existing run id changes too."""
    cfg = build_config()
    assert config_lib.run_id(cfg) == config_lib.run_id(config_lib.from_dict(config_lib.to_dict(cfg)))
    assert config_lib.run_id(cfg) == PINNED_DEFAULT_RUN_ID


PINNED_DEFAULT_RUN_ID = "dino-1e4acb5a"


# ---- malformed YAML and unsafe study names (issue 16) ---------------------------------------------


def test_duplicate_key_names_key_file_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\noptim:\n  epochs: 2\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        config_lib.read_yaml(path)
    msg = str(info.value)
    assert "duplicate key 'lr'" in msg and str(path) in msg and "line 5" in msg and "line 4" in msg
    path.write_text("seed: 1\nseed: 1\n")  # even an identical value is refused
    with pytest.raises(ConfigError, match="line 2: duplicate key 'seed'"):
        load_config(path)


def test_duplicate_check_keeps_ordinary_yaml_working(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("defaults: &d {epochs: 2, lr: 0.1}\n")
    assert config_lib.read_yaml(path) == {"defaults": {"epochs": 2, "lr": 0.1}}
    path.write_text("a: &d {epochs: 2, lr: 0.1}\nb:\n  <<: *d\n  lr: 0.3\nc: [{x: 1}, {x: 2}]\n")
    assert config_lib.read_yaml(path)["b"] == {"epochs": 2, "lr": 0.3}  # merge keys may be overridden
    path.write_text("")
    assert config_lib.read_yaml(path) == {}


@pytest.mark.parametrize("text, fragment", [
    ("- 1\n- 2\n", "at the top level, got a list"),
    ("just a string\n", "at the top level, got a string"),
    ("optim: {lr: 1\n", "is not valid YAML: line 2"),
])
def test_non_mapping_or_broken_file_is_one_line_error(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("base, fragment", [
    ("[a.yaml, b.yaml]", "'base' must be the path of one config file"),
    ("{x: 1}", "'base' must be the path of one config file"),
    ("nowhere.yaml", "'base' names 'nowhere.yaml'"),
])
def test_bad_base_is_a_config_error(tmp_path, base, fragment):
    path = tmp_path / "child.yaml"
    path.write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(path)


@pytest.mark.parametrize("name", ["../x", "../../x", "/abs/path", "a/b", "..", "a..b", ".hidden", "", "has space",
                                  "x" * 101])
def test_unsafe_study_names_are_refused(name):
    with pytest.raises(ConfigError, match="study name .* is not allowed: a study name must be"):
        config_lib.check_study_name(name)
    with pytest.raises(ConfigError, match="study name"):
        config_lib.run_dir(build_config({"study": name}))


@pytest.mark.parametrize("name", ["default", "fashion_mnist_dino", "dino-vits16.100ep", "A1", "x" * 100])
def test_safe_study_names_are_kept(name, tmp_path):
    cfg = build_config({"study": name, "tracking": {"runs_root": str(tmp_path / "runs")}})
    directory = config_lib.run_dir(cfg)
    assert directory == tmp_path / "runs" / name / config_lib.run_id(cfg)
    assert directory.resolve().is_relative_to((tmp_path / "runs").resolve())


def test_study_key_in_config_file_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("study: ../elsewhere\n")
    with pytest.raises(ConfigError, match=r"study name '\.\./elsewhere' \(key 'study' in"):
        config_lib.load_config_tree(path)


# ---- every value checked before any run (issue 16 item 1) -----------------------------------------


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("method.teacher_temp=0", "method.teacher_temp=0.0: must be > 0"),
    ("method.warmup_teacher_temp=-0.04", "method.warmup_teacher_temp=-0.04: must be > 0"),
    ("method.student_temp=0", "method.student_temp=0.0: must be > 0"),
    ("trainer.precision=banana", "trainer.precision='banana'; valid: 32-true, 64-true, bf16-mixed, 16-mixed"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("eval.knn_k=[0,20]", "eval.knn_k=[0, 20]: must be a non-empty list, each >= 1"),
    ("eval.knn_k=[-5,20]", "eval.knn_k=[-5, 20]"),
    ("method.momentum_teacher=1.5", "method.momentum_teacher=1.5: must be in [0, 1]"),
    ("method.momentum_teacher_end=-0.1", "method.momentum_teacher_end=-0.1: must be in [0, 1]"),
    ("data.local_crop_size=0", "data.local_crop_size=0: must be >= 4 with data.local_crops_number=6"),
    ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("method.head_nlayers=0", "method.head_nlayers=0: must be >= 1"),
    ("data.eval_crop_size=0", "data.eval_crop_size=0: must be >= 1"),
    ("data.eval_resize=-28", "data.eval_resize=-28: must be >= 1"),
    ("data.local_crops_number=-2", "data.local_crops_number=-2: must be >= 0"),
    ("data.batch_size=-8", "data.batch_size=-8: must be >= 1"),
    ("optim.epochs=0", "optim.epochs=0: must be >= 1"),
    ("optim.min_lr=-1e-6", "optim.min_lr=-1e-06: must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.layerwise_decay=0", "optim.layerwise_decay=0.0: must be in (0, 1]"),
    ("data.aug.flip_p=1.5", "data.aug.flip_p=1.5: must be in [0, 1]"),
    ("data.aug.blur_p=[1,1]", "data.aug.blur_p=[1.0, 1.0]: must be 3 values, each in [0, 1]"),
    ("data.aug.color_jitter=[0.4,0.4,0.2,0.9]", "data.aug.color_jitter=[0.4, 0.4, 0.2, 0.9]: must be 4 values"),
    ("data.aug.blur_sigma=[2,0.1]", "data.aug.blur_sigma=[2.0, 0.1]: must be [low, high] with 0 < low <= high"),
    ("backbone.drop_path_rate=1", "backbone.drop_path_rate=1.0: must be in [0, 1)"),
    ("backbone.patch_size=0", "backbone.patch_size=0: must be null or >= 1"),
    ("backbone.layerscale=0", "backbone.layerscale=0.0: must be null or > 0"),
    ("method.center_momentum=2", "method.center_momentum=2.0: must be in [0, 1]"),
    ("method.head_hidden_dim=0", "method.head_hidden_dim=0: must be >= 1"),
    ("method.ibot_out_dim=0", "method.ibot_out_dim=0: must be null or >= 1"),
    ("method.koleo_weight=-1", "method.koleo_weight=-1.0: must be >= 0"),
    ("method.mask_ratio=[0.1,1.0]", "method.mask_ratio=[0.1, 1.0]: must be [low, high] with 0 <= low <= high < 1"),
    ("eval.knn_temperature=0", "eval.knn_temperature=0.0: must be > 0"),
    ("eval.chunk_size=0", "eval.chunk_size=0: must be >= 1"),
    ("linear.lrs=[]", "linear.lrs=[]: must be a non-empty list, each > 0"),
    ("linear.momentum=1.1", "linear.momentum=1.1: must be in [0, 1]"),
    ("linear.val_fraction=1", "linear.val_fraction=1.0: must be in (0, 1)"),
    ("trainer.accelerator=gpuu", "trainer.accelerator='gpuu'; valid: cpu, gpu, cuda, mps, auto; did you mean 'gpu'"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be -1 (all epochs) or >= 1"),
    ("trainer.num_threads=0", "trainer.num_threads=0: must be null or >= 1"),
    ("train.collapse_kl=-1", "train.collapse_kl=-1.0: must be >= 0"),
    ("train.diagnostics_every_n_steps=-1", "train.diagnostics_every_n_steps=-1: must be >= 0"),
    ("tracking.log_every_n_steps=0", "tracking.log_every_n_steps=0: must be >= 1"),
    ("tracking.runs_root=''", "tracking.runs_root='': must be a non-empty path"),
    ("seed=-1", "seed=-1: must be in [0, 4294967295]"),
])
def test_every_bad_value_is_refused_naming_key_value_and_range(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_precision_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match="trainer.precision='16mixed'; valid: .*; did you mean '16-mixed'"):
        load_config(None, ["trainer.precision=16mixed"])


@pytest.mark.parametrize("precision", config_lib.PRECISIONS)
def test_supported_precisions_are_accepted(precision):
    assert load_config(None, [f"trainer.precision={precision}"]).trainer.precision == precision


def test_all_problems_are_reported_in_one_message_one_line_each():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lr=-1", "method.teacher_temp=0", "data.num_workers=-1", "trainer.precision=banana",
                           "eval.knn_report_k=7"])
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    for key in ("optim.lr=", "method.teacher_temp=", "data.num_workers=", "trainer.precision=", "eval.knn_report_k="):
        assert sum(line.startswith(key) for line in lines) == 1, (key, lines)


def test_every_numeric_field_has_a_rule():
    """A new numeric or choice field gets its check in the same edit (config.checked)."""
    import dataclasses
    import typing

    def walk(section, prefix=""):
        hints = typing.get_type_hints(type(section))
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{item.name}.")
            elif str(hints[item.name]) not in ("<class 'bool'>", "typing.Optional[bool]", "typing.Any"):
                yield f"{prefix}{item.name}", item

    unchecked = [key for key, item in walk(build_config()) if "check" not in item.metadata]
    # free text: registry names (checked in train.validate_config), paths, W&B names, timm kwargs, tags
    assert sorted(unchecked) == sorted(["study", "data.name", "data.root", "backbone.name", "backbone.kwargs",
                                        "method.name", "tracking.wandb_project", "tracking.wandb_entity",
                                        "tracking.wandb_tags"])


def test_local_crop_size_is_checked_only_when_local_crops_are_used():
    assert load_config(None, ["data.local_crops_number=0", "data.local_crop_size=0"]).data.local_crop_size == 0
    with pytest.raises(ConfigError, match=r"data.local_crop_size=3: must be >= 4 .*backbone.patch_size=4"):
        load_config(None, ["data.local_crop_size=3"])
    # a ResNet has no patches: any size >= 1
    resnet = ["backbone.name=resnet18", "data.local_crop_size=3"]
    assert load_config(None, resnet).data.local_crop_size == 3
    with pytest.raises(ConfigError, match=r"data.local_crop_size=0: must be >= 1 with data.local_crops_number=6;"):
        load_config(None, ["backbone.name=resnet18", "data.local_crop_size=0"])


def test_subset_must_give_one_step_per_epoch():
    assert load_config(None, ["data.subset=64", "data.batch_size=32", "trainer.devices=2"]).data.subset == 64
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.subset=100", "data.batch_size=32", "trainer.devices=2", "trainer.num_nodes=2"])
    assert "data.subset=100 gives no training step per epoch: a step needs 128 images" in str(info.value)


def test_collapse_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="train.collapse_entropy_low=0.99 must be below train.collapse_entropy_high"):
        load_config(None, ["train.collapse_entropy_low=0.99"])


def test_physical_cores_and_a_thread_count_are_refused_together():
    assert load_config(None, ["speed.physical_cores=true"]).speed.physical_cores is True
    with pytest.raises(ConfigError, match="speed.physical_cores=true sets one thread per core, but "
                                          "trainer.num_threads=2 sets the count"):
        load_config(None, ["speed.physical_cores=true", "trainer.num_threads=2"])


def test_field_rules_do_not_enter_the_run_id():
    """Metadata is not a value: the pinned defaults hash is unchanged and a rule-less copy hashes the same."""
    cfg = build_config()
    assert config_lib.run_id(cfg) == PINNED_DEFAULT_RUN_ID
    assert config_lib.to_dict(cfg) == config_lib.to_dict(config_lib.from_dict(config_lib.to_dict(cfg)))


# ---- every default and every experiments/ file still validates -------------------------------------


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_files():
    return sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.parent.name != "references")  # references: tables


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_experiment_file_validates(path):
    from ssl_bench.launch.grid import STUDY_KEYS, load_study

    data = config_lib.read_yaml(path)
    if data and set(data) <= set(STUDY_KEYS) and {"grid", "seeds", "config"} & set(data):
        assert load_study(path).runs
    else:
        config_lib.check_values(load_config(path))


def test_experiment_files_are_found():
    names = {p.name for p in experiment_files()}
    assert {"demo.yaml", "fashion_mnist_dino.yaml", "dino_vits16_100ep.yaml", "dino_table7_ablation.yaml"} <= names


def test_defaults_validate():
    config_lib.check_values(build_config())
    config_lib.check_values(config_lib.Config())
