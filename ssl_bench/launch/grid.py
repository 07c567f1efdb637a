"""Study files -> validated RunSpecs (named arms x cartesian grid axes x seeds).

A study file::

    study: demo                      # optional; defaults to the file name
    base: fashion_mnist_dino.yaml    # config file every run starts from (relative path)
    config: {optim: {epochs: 2}}     # overrides applied to every run
    arms:                            # optional: named sets of keys that vary together
      - {name: full, method.name: dino}
      - {name: no_multicrop, method.name: dino_no_multicrop, data.global_crop_scale: [0.14, 1.0]}
    grid:                            # cartesian product of dotted keys (times the arms)
      method.teacher_temp: [0.04, 0.07]
    seeds: [0, 1]

An arm's name is the ``arm`` axis of the study (``grid plan``, tables, labels); it is not part of
the config, so a run's id depends only on the config its arm resolves to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_bench import config as config_lib

STUDY_KEYS = ("study", "description", "base", "config", "arms", "grid", "seeds")
ARM_AXIS = "arm"  # the axis name under which a study's named arms appear
ARM_RESERVED = {"study": "the study name comes from the study file",
                "seed": "seeds come from the study file's 'seeds:'"}


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its id, resolved config and the axis values that made it."""

    run_id: str
    config: config_lib.Config
    axes: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def run_dir(self) -> Path:
        return config_lib.run_dir(self.config)

    @property
    def method(self) -> str:
        return self.config.method.name


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    axes: dict[str, list[Any]]
    seeds: list[int]
    runs: list[RunSpec]


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Read, expand and type-check a study; ``overrides`` apply to every run."""
    path = Path(path)
    data = _read_study_file(path)
    name = config_lib.check_study_name(data.get("study") or path.stem,
                                       f"key 'study' in {str(path)!r}" if data.get("study") else
                                       f"the file name of {str(path)!r}; set 'study:' to choose another")
    base_tree = config_lib.load_config_tree(config_lib.check_base(data["base"], path, "study file")) \
        if data.get("base") is not None else {}
    shared = config_lib.deep_merge(base_tree, _mapping(data, "config", path))
    shared = config_lib.deep_merge(shared, _study_overrides(overrides, path))
    axes = _read_axes(data.get("grid") or {}, path)
    arms = _read_arms(data.get("arms"), path, axes)
    if arms:
        axes = {ARM_AXIS: list(arms), **axes}
    seeds = _read_seeds(data.get("seeds"), path)
    runs = _make_specs(shared, name, axes, seeds, path, arms)
    _check_unique(runs, path)
    for spec in runs:
        spec.run_dir  # noqa: B018 -- raises ConfigError unless inside tracking.runs_root
    return Study(name, path, axes, seeds, runs)


def _read_study_file(path: Path) -> dict[str, Any]:
    data = config_lib.read_yaml(path, kind="study file")
    if not data:
        raise config_lib.ConfigError(f"study file {str(path)!r} is empty; a study needs at least 'base:' or "
                                     f"'config:' (valid study keys: {', '.join(STUDY_KEYS)})")
    unknown = sorted(map(str, set(data) - set(STUDY_KEYS)))
    if unknown:
        raise config_lib.ConfigError(f"study file {str(path)!r}: unknown key(s) {unknown}; "
                                     f"valid study keys: {', '.join(STUDY_KEYS)}")
    return data


def _mapping(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_lib.ConfigError(f"study file {str(path)!r}: {key!r} must be a mapping of config keys "
                                     f"(e.g. {key}: {{optim: {{epochs: 2}}}}), got {value!r}")
    config_lib.check_keys(value, source=f"{path} '{key}'")
    if "study" in value:
        raise config_lib.ConfigError(f"study file {str(path)!r}: 'config' may not set 'study'; the study name "
                                     f"comes from the study file's top-level 'study:' key (or its file name)")
    return value


def _study_overrides(overrides: list[str], path: Path) -> dict[str, Any]:
    tree = config_lib.parse_overrides(list(overrides))
    if "study" in tree:
        raise config_lib.ConfigError(f"override 'study={tree['study']}' is not allowed here: the study name comes "
                                     f"from the study file {str(path)!r} (its 'study:' key, or its file name)")
    return tree


def _read_axes(grid: Any, path: Path) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise config_lib.ConfigError(f"study file {str(path)!r}: 'grid' must map dotted keys to lists of values, "
                                     f"got {grid!r}")
    axes = {}
    for key, values in grid.items():
        if not isinstance(key, str) or not key:
            raise config_lib.ConfigError(f"study file {str(path)!r}: grid axis {key!r} must be a dotted config key "
                                         f"such as method.name")
        if key == "study":
            raise config_lib.ConfigError(f"study file {str(path)!r}: 'study' cannot be a grid axis; the study name "
                                         f"comes from the study file")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise config_lib.ConfigError(f"study file {str(path)!r}: grid axis {key!r} has no values")
        _check_dotted(key, values[0], f"{path} grid")
        axes[key] = values
    return axes


def _read_arms(arms: Any, path: Path, axes: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """Arm name -> its dotted keys and values, in file order; every problem names the arm and the key."""
    if arms is None:
        return {}
    where = f"study file {str(path)!r}"
    example = "arms: [{name: full, method.name: dino}, {name: no_momentum, method.name: dino_no_momentum}]"
    if not isinstance(arms, list) or not arms:
        raise config_lib.ConfigError(f"{where}: 'arms' must be a non-empty list of mappings, each with a 'name' "
                                     f"and the dotted keys it sets, e.g. {example}; got {arms!r}")
    out: dict[str, dict[str, Any]] = {}
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or not isinstance(arm.get("name"), str) or not arm["name"].strip():
            raise config_lib.ConfigError(f"{where}: arm {i} must be a mapping with a non-empty string 'name' "
                                         f"(e.g. {example}); got {arm!r}")
        name = arm["name"]
        if name in out:
            raise config_lib.ConfigError(f"{where}: arm name {name!r} is given twice; each arm needs its own name")
        keys = {k: v for k, v in arm.items() if k != "name"}
        for key, value in keys.items():
            if not isinstance(key, str) or not key:
                raise config_lib.ConfigError(f"{where}: arm {name!r}: {key!r} must be a dotted config key")
            if key in ARM_RESERVED:
                raise config_lib.ConfigError(f"{where}: arm {name!r} may not set {key!r}; {ARM_RESERVED[key]}")
            if key in axes:
                raise config_lib.ConfigError(f"{where}: arm {name!r} sets {key!r}, which is also a grid axis; "
                                             f"set it in the arms or in the grid, not both")
            _check_dotted(key, value, f"{path} arm {name!r}")
        out[name] = keys
    return out


def _check_dotted(key: str, value: Any, source: str) -> None:
    """An unknown dotted key is an error naming ``source`` and the valid keys (config_lib.check_keys)."""
    probe: dict[str, Any] = {}
    config_lib.set_dotted(probe, key, value)
    config_lib.check_keys(probe, source=source)


def _read_seeds(seeds: Any, path: Path) -> list[int]:
    if seeds is None:
        return [0]
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise config_lib.ConfigError(f"study file {str(path)!r}: 'seeds' must be a list of integers, got {seeds}")
    return seeds


def _product(axes: dict[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    keys = list(axes)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _make_specs(shared: dict[str, Any], study: str, axes: dict[str, list[Any]], seeds: list[int],
                path: Path, arms: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """Every run of the grid; the problems of all runs are reported at once, each problem once with the
    runs that have it (a bad value in ``config:`` is one line, not one per run)."""
    runs: list[RunSpec] = []
    problems: dict[str, list[str]] = {}
    for combo in _product(axes):
        for seed in seeds:
            try:
                runs.append(make_spec(shared, study, combo, seed, str(path), arms))
            except config_lib.ConfigError as exc:
                label = ", ".join([*(f"{k}={v}" for k, v in combo), f"seed={seed}"])
                for line in str(exc).splitlines():
                    problems.setdefault(line, []).append(label)
    if problems:
        total = len(list(_product(axes))) * len(seeds)
        raise config_lib.ConfigError("\n".join(
            line + ("" if len(labels) == total else f" (run {labels[0]}" + (f" and {len(labels) - 1} more)"
                                                                              if len(labels) > 1 else ")"))
            for line, labels in problems.items()))
    return runs


def make_spec(shared: dict[str, Any], study: str, combo: tuple[tuple[str, Any], ...], seed: int,
              source: str, arms: dict[str, dict[str, Any]] | None = None) -> RunSpec:
    """One run: ``shared``, then the keys of its arm (the ``arm`` axis of ``combo``), then its grid point."""
    tree = config_lib.deep_merge(shared, {"study": study, "seed": seed})
    for key, value in combo:
        settings = (arms or {})[value] if key == ARM_AXIS else {key: value}
        for dotted, setting in settings.items():
            point: dict[str, Any] = {}
            config_lib.set_dotted(point, dotted, setting)
            tree = config_lib.deep_merge(tree, point)
    label = ", ".join(f"{k}={v}" for k, v in combo) or "base"
    cfg = config_lib.build_config(tree, source=f"{source} [{label}, seed={seed}]")
    return RunSpec(config_lib.run_id(cfg), cfg, combo, seed)


def _check_unique(runs: list[RunSpec], path: Path) -> None:
    seen: dict[str, RunSpec] = {}
    for spec in runs:
        if spec.run_id in seen:
            raise config_lib.ConfigError(
                f"study file {str(path)!r}: runs {dict(seen[spec.run_id].axes)} and {dict(spec.axes)} resolve to "
                f"the same config ({spec.run_id}); an axis does not change anything")
        seen[spec.run_id] = spec


def validate(study: Study) -> None:
    """Check every run (registries, model build, data reachable) before any starts."""
    from ssl_bench.run.train import validate_config  # lazy: pulls in torch

    checked: set[str] = set()
    for spec in study.runs:
        label = f"run {spec.run_id} ({', '.join(f'{k}={v}' for k, v in spec.axes)}, seed={spec.seed})"
        validate_config(spec.config, label, check_data=repr(spec.config.data) not in checked)
        checked.add(repr(spec.config.data))

