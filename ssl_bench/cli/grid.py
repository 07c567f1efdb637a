"""``ssl-bench grid plan|launch|status|cancel``: a study on this machine or on a SLURM cluster."""

from __future__ import annotations

import argparse

from ssl_bench import config as config_lib

CLUSTER_CHOICES = ("local", "slurm", "submitit-local", "debug")  # local: in this process, one run after another


def load_study(args: argparse.Namespace):
    from ssl_bench.launch.grid import load_study as load

    return load(args.study, args.overrides)


def plan_rows(study) -> list[dict]:
    from ssl_bench.report.collect import read_json
    from ssl_bench.tracking import OWNER_KEY, check_owner

    rows = []
    for spec in study.runs:
        result = read_json(spec.run_dir / "result.json") or {}
        status = result.get("status", "pending")
        if status == "running":  # a record left by a process that is gone is lost, never running
            lost, note = check_owner(result.get(OWNER_KEY))
            status = f"lost ({note})" if lost else status
        rows.append({"run_id": spec.run_id, "method": spec.method, **{k: v for k, v in spec.axes if k != "method.name"},
                     "seed": spec.seed, "status": status, "run_dir": str(spec.run_dir)})
    return rows


def _profile(args: argparse.Namespace):
    """The cluster profile for --cluster slurm/submitit-local/debug (local-test by default off SLURM)."""
    from ssl_bench.launch.profiles import Profile, load_profile

    if args.cluster == "local":
        if args.profile:
            raise config_lib.ConfigError("--profile needs --cluster slurm (or submitit-local/debug)")
        return None
    if args.profile:
        return load_profile(args.profile)
    if args.cluster == "slurm":
        from ssl_bench.launch.profiles import available_profiles

        raise config_lib.ConfigError(f"--cluster slurm needs --profile NAME_OR_FILE; profiles in slurm/profiles/: "
                                     f"{', '.join(available_profiles()) or 'none'}")
    return Profile(name=args.cluster)


def _validate(study, args: argparse.Namespace):
    """Every run checked (registries, model, data; a profile's resources, else this machine's) before any starts."""
    from ssl_bench.launch.grid import validate
    from ssl_bench.tracking.wandb_mirror import check_wandb

    validate(study)
    for mode in sorted({spec.config.tracking.wandb for spec in study.runs}):
        check_wandb(next(s.config for s in study.runs if s.config.tracking.wandb == mode))  # key before submitting
    profile = _profile(args)
    if profile is None:  # runs on this machine: its devices must exist (with a profile, the profile decides)
        from ssl_bench.run.train import check_local_devices

        for spec in study.runs:
            check_local_devices(spec.config, f"run {spec.run_id}")
        return None
    from ssl_bench.launch.slurm import validate_for_cluster

    for warning in validate_for_cluster(study, profile, _submitit_cluster(args.cluster), train_size):
        print(f"[ssl-bench] warning: {warning}", flush=True)
    return profile


def train_size(cfg: config_lib.Config) -> int:
    """Images in the run's SSL training set (the seeded subset, if any)."""
    from ssl_bench.data import dataset_size

    n = dataset_size(cfg.data, "train")  # image folders: a cached index, not a walk of the tree on the login node
    return min(n, cfg.data.subset) if cfg.data.subset else n


def _submitit_cluster(cluster: str) -> str:
    return {"submitit-local": "local"}.get(cluster, cluster)


def cmd_grid_plan(args: argparse.Namespace) -> int:
    import pandas as pd

    study = load_study(args)
    profile = _validate(study, args)
    print(f"study {study.name!r}: {len(study.runs)} runs "
          f"({' x '.join(f'{len(v)} {k}' for k, v in study.axes.items()) or 'no axes'} x {len(study.seeds)} seeds)"
          + (f"; resources checked against profile {profile.name!r}" if profile else ""))
    print(pd.DataFrame(plan_rows(study)).to_markdown(index=False))
    if args.estimate:
        from ssl_bench.bench.estimate import estimate, format_estimate

        if args.probe_steps < 1:
            raise config_lib.ConfigError(f"--probe-steps must be >= 1, got {args.probe_steps}")
        result = estimate(study.runs, probe_steps=args.probe_steps)
        accelerators = sorted({spec.config.trainer.accelerator for spec in study.runs})
        print(format_estimate(result, "/".join("GPU" if a in ("gpu", "cuda") else a for a in accelerators)))
    return 0


def cmd_grid_launch(args: argparse.Namespace) -> int:
    study = load_study(args)
    profile = _validate(study, args)  # every run is checked before the first one starts or is submitted
    evals = _eval_kinds(args.eval)
    if profile is None:
        if evals or args.dry_run or args.wait or args.eval_devices:
            raise config_lib.ConfigError("--eval, --eval-devices, --dry-run and --wait need --cluster slurm "
                                         "(or submitit-local/debug)")
        return _launch_local(study, args.force)
    return _launch_submitit(study, profile, args, evals)


def _eval_kinds(text: str | None) -> list[str]:
    """The --eval names, checked here against the evaluation registry (launch/ may not import eval/)."""
    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    if not kinds:
        return []
    from ssl_bench.eval.protocol import chained_names, protocols

    valid = chained_names()
    bad = [k for k in kinds if k not in valid]
    if bad:
        unknown = [k for k in bad if k not in protocols()]
        problems = ([f"unknown evaluation(s) {unknown}"] if unknown else []) + [
            f"{k!r} needs input files and cannot follow training" for k in bad if k not in unknown]
        raise config_lib.ConfigError(f"--eval {text!r}: {'; '.join(problems)}; valid: {', '.join(valid)}")
    return kinds


def _eval_devices(choice: str | None, evals: list[str]) -> str:
    """--eval-devices: as given, else the training job's devices when a chosen protocol shards its work."""
    from ssl_bench.launch.slurm import EVAL_DEVICES, EVAL_ON_TRAIN_SHAPE

    if choice is not None:
        if choice not in EVAL_DEVICES:
            raise config_lib.ConfigError(f"--eval-devices {choice!r}; valid: {', '.join(EVAL_DEVICES)}")
        if not evals:
            raise config_lib.ConfigError("--eval-devices needs --eval")
        return choice
    if not evals:
        return "1"
    from ssl_bench.eval.protocol import sharded_names

    return EVAL_ON_TRAIN_SHAPE if set(evals) & set(sharded_names()) else "1"


def _launch_local(study, force: bool) -> int:
    from ssl_bench.launch.local import launch_local

    print(f"study {study.name!r}: {len(study.runs)} runs, local launcher", flush=True)
    summary = launch_local(study, force=force)
    print(f"study {study.name!r}: {len(summary.completed)} completed, {len(summary.skipped)} skipped "
          f"(already completed), {len(summary.failed)} failed")
    for run_id, error in summary.failed.items():
        print(f"  FAILED {run_id}: {error}")
    if summary.stopped:
        print(f"study {study.name!r} stopped: {summary.stopped}")
    return 0 if summary.ok else 1


def _launch_submitit(study, profile, args: argparse.Namespace, evals: list[str]) -> int:
    from ssl_bench.launch import slurm

    eval_devices = _eval_devices(args.eval_devices, evals)
    specs, skipped = slurm.select_runs(study, force=args.force)
    for run_id, why in skipped.items():
        print(f"[ssl-bench] {run_id}: not submitted ({why})")
    if not specs:
        print(f"study {study.name!r}: nothing to submit; all {len(study.runs)} runs are completed or queued")
        return 0
    if args.dry_run:
        print(f"study {study.name!r}: would submit {len(specs)} of {len(study.runs)} runs "
              f"(profile {profile.name!r}, {profile.source or 'built-in'}); nothing submitted\n")
        print(slurm.dry_run_text(study, specs, profile, evals, eval_devices))
        return 0
    sub = slurm.submit(study, specs, profile, _submitit_cluster(args.cluster), evals, force=args.force,
                       eval_devices=eval_devices)
    print(f"study {study.name!r}: submitted {len(sub.train_jobs)} run(s) as array(s) {', '.join(sub.arrays)} "
          f"in {sub.submit_s:.2f} s (code snapshot {sub.snapshot})")
    for run_id, job_id in sub.train_jobs.items():
        print(f"  {run_id}: job {job_id}" + (f", evals job {sub.eval_jobs[run_id]}" if run_id in sub.eval_jobs else ""))
    if not args.wait:
        print(f"follow with: ssl-bench grid status {args.study}")
        return 0
    states = slurm.wait(study, sub, poll_s=args.poll)
    failed = {r: s for r, s in states.items() if s not in ("completed", "collapsed")}
    print(f"study {study.name!r}: {len(states) - len(failed)} finished, {len(failed)} failed"
          + "".join(f"\n  FAILED {r}: {s}" for r, s in failed.items()))
    return 1 if failed else 0


def cmd_grid_status(args: argparse.Namespace) -> int:
    import pandas as pd

    from ssl_bench.launch.status import rows_for_table, study_status, torn_summary

    study = load_study(args)
    states = study_status(study)
    print(f"study {study.name!r}: {len(states)} runs")
    print(pd.DataFrame(rows_for_table(states)).to_markdown(index=False))
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    torn = torn_summary(states)
    if torn:
        print(torn)
    return 0


def cmd_grid_cancel(args: argparse.Namespace) -> int:
    from ssl_bench.launch.status import cancel

    study = load_study(args)
    cancelled = cancel(study)
    for run_id, job_id in cancelled.items():
        print(f"cancelled {run_id}: job {job_id}")
    print(f"study {study.name!r}: {len(cancelled)} job(s) cancelled" if cancelled else
          f"study {study.name!r}: no pending or running SLURM job")
    return 0


def add_grid_parser(sub) -> None:
    grid = sub.add_parser("grid", help="plan, launch, follow or cancel a study")
    grid_sub = grid.add_subparsers(dest="grid_command", required=True)
    for name, func, text in (("plan", cmd_grid_plan, "validate and list the runs of a study"),
                             ("launch", cmd_grid_launch, "run or submit every run not yet completed"),
                             ("status", cmd_grid_status, "state, job, nodes, restarts and progress of each run"),
                             ("cancel", cmd_grid_cancel, "scancel the study's pending and running jobs")):
        p = grid_sub.add_parser(name, help=text)
        p.add_argument("study", help="study YAML file in experiments/")
        p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
        if name in ("plan", "launch"):
            p.add_argument("--cluster", choices=CLUSTER_CHOICES, default="local",
                           help="local: this process, one run after another (default); slurm: one submitit job "
                                "array per study; submitit-local/debug: the same path without SLURM")
            p.add_argument("--profile", help="cluster profile: a name in slurm/profiles/ or a YAML file")
        if name == "plan":
            p.add_argument("--estimate", action="store_true",
                           help="probe the throughput of each distinct backbone/crop setting on this machine and "
                                "print the estimated device-hours per run and for the grid")
            p.add_argument("--probe-steps", type=int, default=5, help="timed steps per probe (after 2 warm-up)")
        if name == "launch":
            p.add_argument("--force", action="store_true", help="rerun completed runs too")
            p.add_argument("--dry-run", action="store_true", help="print the sbatch parameters per run; submit nothing")
            p.add_argument("--eval", help="evaluations chained after training as dependent jobs, e.g. knn,linear "
                                          "(any protocol of `ssl-bench eval` that takes no input files)")
            p.add_argument("--eval-devices", help="devices of each eval job: 'train' (the training job's nodes x "
                                                  "devices; k-NN and linear shard their features over them) or "
                                                  "'1' (default: 'train' when --eval has knn or linear, else '1')")
            p.add_argument("--wait", action="store_true", help="wait for the runs, printing each state change")
            p.add_argument("--poll", type=float, default=10.0, help="seconds between status polls with --wait")
        p.set_defaults(func=func)
