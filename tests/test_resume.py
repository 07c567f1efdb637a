"""Exact resume of an interrupted run: no finished step repeated or lost, final weights of an uninterrupted run.

Weights, centers and optimizer states are compared with ``torch.equal`` (bitwise): the resumed
run replays the same batches (ResumableLoader), the same RNG streams (saved per rank) and the
same float operations in the same order on the same CPU thread count, so nothing may differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ssl_bench import tracking
from ssl_bench.run import checkpoints, preemption
from ssl_bench.run import train
from ssl_bench import config as config_lib
from ssl_bench.methods import dino

# 2 epochs x 4 steps (32 images, batch 8); last.ckpt at steps 3, 4 (epoch end), 6 and 8. Depth 2, because
# timm spreads drop_path_rate over the blocks from 0: with one block nothing would draw random numbers.
RESUMABLE = {"backbone": {"depth": 2}, "optim": {"epochs": 2}, "trainer": {"max_steps": -1},
             "train": {"checkpoint_every_n_steps": 3}, "eval": {"knn_init": False}}
STEPS = 8


_REFERENCE: dict = {}


@pytest.fixture
def tree(tiny_tree) -> dict:
    """The TINY override tree made resumable, writing under this test's tmp_path."""
    return config_lib.deep_merge(tiny_tree, RESUMABLE)


def make_cfg(tree: dict, **extra) -> config_lib.Config:
    return config_lib.build_config(tree, extra)


@pytest.fixture
def reference(tree, tmp_path_factory) -> dict:
    """The final checkpoint and record of the uninterrupted run (computed once: the same for every test)."""
    if not _REFERENCE:
        result = train.run(make_cfg(tree, tracking={"runs_root": str(tmp_path_factory.mktemp("reference"))}))
        _REFERENCE.update(ckpt=final_checkpoint(result.run_dir), record=tracking.read_result(result.run_dir))
    return _REFERENCE


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training_state(ckpt: dict, ref: dict) -> None:
    assert ckpt["global_step"] == ref["global_step"] == STEPS
    state, ref_state = ckpt["state_dict"], ref["state_dict"]
    assert state.keys() == ref_state.keys() and any(k.startswith("centering.") for k in state)
    assert {k.split(".")[0] for k in state} >= {"student", "teacher", "centering"}
    different = [k for k in ref_state if not torch.equal(state[k], ref_state[k])]
    assert not different, different[:5]
    opt, ref_opt = ckpt["optimizer_states"][0]["state"], ref["optimizer_states"][0]["state"]
    assert opt.keys() == ref_opt.keys()
    assert all(torch.equal(opt[i][name], ref_opt[i][name]) for i in ref_opt for name in ref_opt[i])


def preempt_at(monkeypatch, step: int, seen: list | None = None) -> None:
    """A 'signal' during training step ``step - 1``: the checkpoint holds ``step`` steps."""
    original = dino.DINO.training_step

    def training_step(self, batch, batch_idx):
        if seen is not None:
            seen.append(preemption.training_active())
        if self.global_step == step - 1:
            preemption.request_preemption_checkpoint()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(dino.DINO, "training_step", training_step)


def interrupt(monkeypatch, cfg: config_lib.Config, step: int) -> preemption.Preempted:
    with monkeypatch.context() as patch:
        preempt_at(patch, step)
        with pytest.raises(preemption.Preempted) as stopped:
            train.run(cfg)
    preemption.clear_preemption_request()
    return stopped.value


def logged_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    return [line["step"] for line in tracking.read_metrics(run_dir) if key in line]


@pytest.mark.parametrize("step, workers", [(2, 0), (4, 0), (7, 0), (5, 2)])
def test_preempted_run_resumes_to_the_uninterrupted_weights(tree, monkeypatch, capsys, reference, step, workers):
    cfg = make_cfg(tree, data={"num_workers": workers})
    stopped = interrupt(monkeypatch, cfg, step)
    run_dir = config_lib.run_dir(cfg)
    assert stopped.step == step
    record = tracking.read_result(run_dir)
    assert record["status"] == "preempted" and record["step"] == step
    assert logged_steps(run_dir) == list(range(step))  # the last step before the stop is logged too
    assert final_checkpoint(run_dir)["global_step"] == step

    result = train.run(cfg)
    assert result.status == "completed" and not result.skipped
    epoch, batch = divmod(step, 4) if step % 4 else (step // 4 - 1, 4)
    assert f"resuming {result.run_id} from step {step} (checkpoints/last.ckpt, epoch {epoch}, batch {batch} of 4)" \
        in capsys.readouterr().out
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])
    record = tracking.read_result(run_dir)
    (entry,) = record["resumes"]
    assert entry["from_step"] == step and entry["checkpoint"] == "last" and entry["slurm_job_id"] is None
    assert entry["reason"] == "preempted" and entry["previous_owner"]["pid"] == os.getpid()
    assert entry["metrics_set_aside"] is None  # a preemption stop leaves no step to redo
    assert record["status"] == "completed" and record["timing"]["train_steps"] == STEPS
    assert record["collapse"] == reference["record"]["collapse"]  # the monitor's streaks came back too
    assert record["metrics"]["knn_top1"] == reference["record"]["metrics"]["knn_top1"]
    assert logged_steps(run_dir) == list(range(STEPS))  # each step exactly once
    assert logged_steps(run_dir, "collapse/rankme") == list(range(STEPS))
    assert not (run_dir / "attempts").exists()  # config.yaml and env.json were not archived


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_tensor_multicrop_run_resumes_to_its_uninterrupted_weights(tree, monkeypatch, tmp_path, augment_on):
    """data.multicrop=tensor: the crops made in the collate function (workers) or after the transfer from the
    collate's seed (device) replay exactly after a mid-epoch stop."""
    tensor = config_lib.deep_merge(tree, {"data": {"multicrop": "tensor", "augment_on": augment_on}})
    uninterrupted = train.run(make_cfg(tensor, tracking={"runs_root": str(tmp_path / "reference")}))
    cfg = make_cfg(tensor)
    assert interrupt(monkeypatch, cfg, 5).step == 5
    result = train.run(cfg)
    assert result.status == "completed" and tracking.read_result(result.run_dir)["resumes"][0]["from_step"] == 5
    assert logged_steps(result.run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(result.run_dir), final_checkpoint(uninterrupted.run_dir))


def test_sigterm_checkpoints_the_step_before_lightning_stops(tree, monkeypatch, reference):
    """Lightning answers SIGTERM with SIGTERMException after the step; the step is checkpointed first."""
    cfg = make_cfg(tree, eval={"knn": False})
    original = dino.DINO.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets trainer.received_sigterm
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(dino.DINO, "training_step", training_step)
        with pytest.raises(preemption.Preempted) as stopped:
            train.run(cfg)
    assert stopped.value.step == 6 and type(stopped.value.__cause__).__name__ == "SIGTERMException"
    run_dir = config_lib.run_dir(cfg)
    assert tracking.read_result(run_dir)["status"] == "preempted"
    train.run(cfg)
    assert tracking.read_result(run_dir)["resumes"][0]["from_step"] == 6
    assert logged_steps(run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_crash_resumes_from_the_last_checkpoint_and_sets_redone_lines_aside(tree, monkeypatch, reference):
    cfg = make_cfg(tree)
    original = dino.DINO.training_step

    def crash_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:  # steps 0-4 done; last.ckpt holds 4 (epoch end), not step 4's successor
            raise RuntimeError("node failure")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(dino.DINO, "training_step", crash_at_step_5)
        with pytest.raises(RuntimeError, match="node failure"):
            train.run(cfg)
    run_dir = config_lib.run_dir(cfg)
    assert tracking.read_result(run_dir)["status"] == "failed"
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]
    train.run(cfg)
    (entry,) = tracking.read_result(run_dir)["resumes"]
    assert entry["from_step"] == 4 and entry["metrics_set_aside"] == "attempts/1/metrics.after_step_4.jsonl"
    assert entry["reason"] == "failed"
    moved = [json.loads(line) for line in (run_dir / entry["metrics_set_aside"]).read_text().splitlines()]
    assert sorted(line["step"] for line in moved) == [4, 4]  # step 4's loss and diagnostics, redone since
    assert logged_steps(run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_killed_run_shows_lost_and_resumes_with_reason_lost(tree, monkeypatch, reference):
    """SIGKILL after step 5 leaves result.json saying running; once its process is gone it is lost, then resumed."""
    from types import SimpleNamespace

    from ssl_bench.launch.status import run_state

    cfg = make_cfg(tree, eval={"knn": False})
    original = dino.DINO.training_step

    def killed_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(dino.DINO, "training_step", killed_at_step_5)
        patch.setattr(train, "_finish", lambda *args: None)  # SIGKILL: no final record
        with pytest.raises(RuntimeError, match="killed"):
            train.run(cfg)
    run_dir = config_lib.run_dir(cfg)
    spec = SimpleNamespace(run_dir=run_dir, run_id=config_lib.run_id(cfg), axes={}, seed=0)
    assert run_state(spec, None, {}).label == "running"  # its owner (this process) is alive
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    record = tracking.read_result(run_dir)
    assert record["status"] == "running"
    tracking.RunDir(run_dir).write_result({**record, "owner": {**record["owner"], "pid": child.pid}})
    assert run_state(spec, None, {}).label == f"lost (process {child.pid} on {record['owner']['host']} is gone)"
    train.run(cfg)
    (entry,) = tracking.read_result(run_dir)["resumes"]
    assert entry["reason"] == "lost" and entry["from_step"] == 4 and entry["previous_owner"]["pid"] == child.pid
    assert run_state(spec, None, {}).label == "completed (resumed 1x (1 lost))"
    assert logged_steps(run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_truncated_last_checkpoint_falls_back_to_previous(tree, monkeypatch, capsys, reference):
    cfg = make_cfg(tree)
    interrupt(monkeypatch, cfg, 6)  # last.ckpt: step 6, previous.ckpt: step 4
    checkpoints = config_lib.run_dir(cfg) / "checkpoints"
    assert final_checkpoint(config_lib.run_dir(cfg))["global_step"] == 6
    data = (checkpoints / "last.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    train.run(cfg)
    out = capsys.readouterr().out
    assert f"cannot resume from {checkpoints / 'last.ckpt'}: " in out
    assert "falling back to checkpoints/previous.ckpt" in out
    assert "from step 4 (checkpoints/previous.ckpt, epoch 0, batch 4 of 4)" in out
    run_dir = config_lib.run_dir(cfg)
    (entry,) = tracking.read_result(run_dir)["resumes"]
    assert entry["checkpoint"] == "previous" and entry["from_step"] == 4
    assert entry["skipped_checkpoints"][0].startswith("checkpoints/last.ckpt: ")
    assert logged_steps(run_dir) == list(range(STEPS))
    assert logged_steps(run_dir / "attempts" / "1", "train/loss") == []  # moved lines live in their own file
    assert [x["step"] for x in map(json.loads, (run_dir / "attempts/1/metrics.after_step_4.jsonl").read_text()
                                   .splitlines()) if "train/loss" in x] == [4, 5]
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_no_loadable_checkpoint_starts_over_and_says_so(tree, monkeypatch, capsys, reference):
    cfg = make_cfg(tree)
    interrupt(monkeypatch, cfg, 6)
    run_dir = config_lib.run_dir(cfg)
    for name in ("last.ckpt", "previous.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    capsys.readouterr()
    train.run(cfg)
    out = capsys.readouterr().out
    assert "falling back to checkpoints/previous.ckpt" in out and "none left" in out
    expected = f"{config_lib.run_id(cfg)}: no loadable checkpoint in {run_dir / 'checkpoints'}; starting from scratch"
    assert expected in out
    record = tracking.read_result(run_dir)
    assert "resumes" not in record and record["fresh_start"]["reason"].startswith("no loadable checkpoint")
    assert record["fresh_start"]["archived_to"] == str(run_dir / "attempts" / "1")
    assert (run_dir / "attempts" / "1" / "checkpoints" / "last.ckpt").read_bytes().endswith(b"not a checkpoint")
    assert logged_steps(run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_corrupt_result_json_is_an_error_and_nothing_is_touched(tree, monkeypatch, capsys):
    """A preempted run whose result.json was torn: no resume without its record, no silent start over."""
    cfg = make_cfg(tree)
    interrupt(monkeypatch, cfg, 6)
    run_dir = config_lib.run_dir(cfg)
    torn = '{"run_id": "x", "status": "preem'
    (run_dir / "result.json").write_text(torn)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(tracking.CorruptRecordError, match=rf"{run_dir / 'result.json'} is corrupt \(not JSON"):
        train.run(cfg)
    assert (run_dir / "result.json").read_text() == torn and not (run_dir / "attempts").exists()
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    # --force is the way out: the attempt, its torn record and checkpoints included, goes to attempts/1.
    train.run(cfg, force=True)
    assert (run_dir / "attempts" / "1" / "result.json").read_text() == torn
    assert {p.name: p.read_bytes() for p in (run_dir / "attempts" / "1" / "checkpoints").iterdir()} == before
    assert tracking.read_result(run_dir)["status"] == "completed"


def test_force_starts_over_and_archives_the_checkpoints(tree, monkeypatch, reference):
    cfg = make_cfg(tree)
    interrupt(monkeypatch, cfg, 2)
    run_dir = config_lib.run_dir(cfg)
    train.run(cfg, force=True)
    archived = run_dir / "attempts" / "1"
    assert tracking.read_result(archived)["status"] == "preempted"
    assert final_checkpoint(archived)["global_step"] == 2  # the old attempt's checkpoint went along
    record = tracking.read_result(run_dir)
    assert record["status"] == "completed" and "resumes" not in record
    assert logged_steps(run_dir) == list(range(STEPS))
    assert_same_training_state(final_checkpoint(run_dir), reference["ckpt"])


def test_resumed_run_keeps_the_knn_at_init(tree, monkeypatch):
    cfg = make_cfg(tree, eval={"knn_init": True})
    interrupt(monkeypatch, cfg, 3)
    run_dir = config_lib.run_dir(cfg)
    init = tracking.read_result(run_dir)["metrics"]
    assert 0 <= init["knn_top1_init"] <= 100  # recorded as soon as it was known
    calls = []
    original = train.knn_metrics
    monkeypatch.setattr(train, "knn_metrics", lambda cfg, backbone, suffix, **kw: (
        calls.append(suffix), original(cfg, backbone, suffix, **kw))[1])
    train.run(cfg)
    assert calls == [""]  # only the final k-NN
    metrics = tracking.read_result(run_dir)["metrics"]
    assert {k: v for k, v in metrics.items() if k.endswith("_init")} == {k: v for k, v in init.items()
                                                                            if k.endswith("_init")}


def test_training_active_only_inside_the_loop(tree, monkeypatch):
    seen: list[bool] = []
    preempt_at(monkeypatch, STEPS + 1, seen)  # never requested
    assert not preemption.training_active()
    train.run(make_cfg(tree, eval={"knn": False}))
    assert seen == [True] * STEPS and not preemption.training_active()


def test_other_runs_checkpoint_and_config_are_not_resumed(tree, monkeypatch, capsys):
    cfg = make_cfg(tree, eval={"knn": False})
    interrupt(monkeypatch, cfg, 3)
    run_dir = config_lib.run_dir(cfg)
    lines: list[str] = []
    assert checkpoints.find_resume_checkpoint(run_dir, "dino-00000000", lines.append) is None
    assert "checkpoint of run " + repr(config_lib.run_id(cfg)) in lines[0] and len(lines) == 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**saved, "seed": 1}))
    capsys.readouterr()
    train.run(cfg)
    other = config_lib.run_id(config_lib.from_dict({**saved, "seed": 1}))
    assert f"config.yaml is of run {other}; starting from scratch" in capsys.readouterr().out
    record = tracking.read_result(run_dir)
    assert "resumes" not in record and record["fresh_start"]["reason"] == f"config.yaml is of run {other}"


# ---- pieces ---------------------------------------------------------------------------------------


class FakeTrainer:
    """Writes ``payload`` as the checkpoint, or dies half-way when ``payload`` is None."""

    is_global_zero = True

    def __init__(self) -> None:
        self.payload: bytes | None = b""

    def save_checkpoint(self, path, weights_only=None) -> None:
        if self.payload is None:
            Path(path).write_bytes(b"half")
            raise OSError("killed while writing")
        Path(path).write_bytes(self.payload)


def test_atomic_save_keeps_the_replaced_checkpoint_as_previous(tmp_path):
    trainer = FakeTrainer()
    for payload in (b"one", b"two", b"three"):
        trainer.payload = payload
        checkpoints.save_checkpoint_atomically(trainer, tmp_path)
    assert (tmp_path / "last.ckpt").read_bytes() == b"three" and (tmp_path / "previous.ckpt").read_bytes() == b"two"
    trainer.payload = None
    with pytest.raises(OSError):
        checkpoints.save_checkpoint_atomically(trainer, tmp_path)
    assert (tmp_path / "last.ckpt").read_bytes() == b"three" and (tmp_path / "previous.ckpt").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.ckpt", "previous.ckpt"]


def test_set_aside_metrics_keeps_the_work_the_checkpoint_holds(tmp_path):
    lines = [{"step": 3, "train/loss": 1.0}, {"step": 3, "collapse/rankme": 2.0}, {"step": 4, "knn/top1": 50.0},
             {"step": 4, "train/loss": 0.9}, {"step": 5, "train/loss": 0.8}]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 6, "train/lo'  # torn by the crash
    (tmp_path / "metrics.jsonl").write_text(text)
    kept, moved = tracking.set_aside_metrics(tmp_path, 4, tmp_path / "attempts" / "2")
    assert kept == 3 and tracking.read_metrics(tmp_path) == lines[:3]  # the epoch-end k-NN at 4 was done
    assert moved == tmp_path / "attempts" / "2" / "metrics.after_step_4.jsonl"
    assert moved.read_text().splitlines()[:2] == [json.dumps(x) for x in lines[3:]]
    assert moved.read_text().splitlines()[2] == '{"step": 6, "train/lo'


def test_new_keys_do_not_change_the_run_id():
    base = config_lib.build_config({})
    other = config_lib.build_config({"train": {"checkpoint_every_n_steps": 0, "resume": False},
                                     "tracking": {"wandb_tags": ["method.name=dino"]}})
    assert config_lib.run_id(base) == config_lib.run_id(other)
    with pytest.raises(config_lib.ConfigError, match="checkpoint_every_n_steps"):
        config_lib.build_config({"train": {"checkpoint_every_n_steps": -1}})


def test_slurm_environment_without_lightning_requeue(tree, tmp_path, monkeypatch):
    cfg = make_cfg(tree)
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    outside = train.build_trainer(cfg, tracking.RunDir(tmp_path))
    assert not isinstance(outside._accelerator_connector.cluster_environment, SLURMEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    inside = train.build_trainer(cfg, tracking.RunDir(tmp_path))
    environment = inside._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


# ---- two gloo ranks --------------------------------------------------------------------------------

INTERRUPT_SCRIPT = """
import sys
from ssl_bench import cli
from ssl_bench.run import preemption
from ssl_bench.methods import dino
step, signalled_rank = int(sys.argv[1]), int(sys.argv[2])
original = dino.DINO.training_step
def training_step(self, batch, batch_idx):
    if self.global_step == step - 1 and self.global_rank == signalled_rank:
        preemption.request_preemption_checkpoint()  # one rank only: the all-reduce must stop both
    return original(self, batch, batch_idx)
dino.DINO.training_step = training_step
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.ddp
def test_two_rank_run_preempted_on_one_rank_resumes_exactly(tmp_path, tree):
    # 64 images / 2 ranks / batch 8 = 4 steps per epoch, 2 epochs
    # trainer.num_threads: the same thread count in both runs (it changes float sums, hence bits)
    tree = config_lib.deep_merge(tree, {"data": {"subset": 64}, "trainer": {"devices": 2, "num_threads": 1},
                                        "eval": {"knn": False}, "train": {"checkpoint_every_n_steps": 2}})
    for name in ("reference", "resumed"):
        (tmp_path / name).mkdir()
        own = config_lib.deep_merge(tree, {"tracking": {"runs_root": str(tmp_path / name / "runs")}})
        (tmp_path / name / "ddp.yaml").write_text(yaml.safe_dump(own))
    (tmp_path / "resumed" / "interrupt.py").write_text(INTERRUPT_SCRIPT)

    def run(name: str, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path / name)

    stopped = run("resumed", "interrupt.py", "3", "1", "train", "ddp.yaml")
    assert stopped.returncode != 0 and "Preempted: preempted: checkpoint saved at step 3" in stopped.stderr
    (run_dir,) = (tmp_path / "resumed" / "runs" / "ddp").iterdir()
    assert tracking.read_result(run_dir)["status"] == "preempted"
    resumed = run("resumed", "-m", "ssl_bench.cli", "train", "ddp.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 3 (checkpoints/last.ckpt, epoch 0, batch 3 of 4)" in resumed.stdout
    reference = run("reference", "-m", "ssl_bench.cli", "train", "ddp.yaml")
    assert reference.returncode == 0, reference.stderr[-3000:]
    ckpt = final_checkpoint(run_dir)
    assert len(ckpt["rng_states"]) == 2  # one per rank
    assert_same_training_state(ckpt, final_checkpoint(tmp_path / "reference" / "runs" / "ddp" / run_dir.name))
    assert logged_steps(run_dir) == list(range(STEPS))
    ddp = tracking.read_result(run_dir)["ddp"]
    assert ddp["world_size"] == 2 and len(set(ddp["teacher_sha256"])) == 1  # the ranks ended in sync
