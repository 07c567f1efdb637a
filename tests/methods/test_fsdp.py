"""``trainer.strategy=fsdp`` on 2 gloo ranks (CPU): FSDP2 ``fully_shard`` of student and teacher.

Each run is a 2-process Lightning run of ``tests/fsdp_script.py``. Checked:

- 3 SGD steps under FSDP give the weights (student, teacher, center) of the same 3 steps under DDP,
  within float rounding (the reduce-scatter sums in another order than DDP's all-reduce), and so
  do 3 steps of 2 accumulated micro-batches under FSDP;
- the checkpoint is sharded: one ``torch.distributed.checkpoint`` file per rank, each holding about
  half of the weights, and every rank's teacher-weight hash (of the gathered weights) is the same;
- a run preempted at step 3 resumes from its sharded checkpoint to the bit-identical weights and AdamW
  state of an uninterrupted run;
- ``ssl-bench eval knn`` reads the run through its consolidated export and gives the run's final k-NN.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_bench import config as config_lib
from ssl_bench.run.checkpoints import consolidated
from tests.methods.test_accumulation import EXACT, _assert_states

pytestmark = pytest.mark.ddp
SCRIPT = Path(__file__).resolve().parents[1] / "fsdp_script.py"


def train(tmp_path: Path, tree: dict, name: str, preempt_step: int = 0) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path), str(preempt_step)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == (3 if preempt_step else 0), out.stdout[-2000:] + out.stderr[-4000:]
    return out


def run_dir_of(tree: dict) -> Path:
    return config_lib.run_dir(config_lib.build_config(tree))


def tree_for(tiny_tree: dict, root: Path, strategy: str, *extra: dict) -> dict:
    tree = config_lib.deep_merge(tiny_tree, {"trainer": {"devices": 2, "strategy": strategy},
                                             "tracking": {"runs_root": str(root)}, "data": {"subset": 64}})
    for part in extra:
        tree = config_lib.deep_merge(tree, part)
    return tree


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("fsdp_exact")
    dirs = {}
    arms = {"ddp": ("ddp", {}), "fsdp": ("fsdp", {}),
            "fsdp_accumulated": ("fsdp", {"data": {"batch_size": 4}, "optim": {"accumulate_grad_batches": 2}})}
    for name, (strategy, extra) in arms.items():
        tree = tree_for(TINY, tmp / "runs", strategy, EXACT, {"eval": {"knn_init": False}}, extra)
        train(tmp, tree, name)
        dirs[name] = run_dir_of(tree)
    return dirs


def test_fsdp_steps_equal_the_ddp_steps(exact_runs):
    ddp = torch.load(exact_runs["ddp"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    fsdp_dir = exact_runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert fsdp_dir.is_dir()
    fsdp = torch.load(consolidated(fsdp_dir), map_location="cpu", weights_only=True)
    assert fsdp["global_step"] == ddp["global_step"] == 3
    _assert_states(fsdp["state_dict"], ddp["state_dict"], close=True)
    moved = [k for k in ddp["state_dict"] if k.startswith("student.") and ddp["state_dict"][k].dtype.is_floating_point
             and not torch.equal(ddp["state_dict"][k], fsdp["state_dict"]["teacher." + k[len("student."):]])]
    assert moved, "student and teacher are equal: the comparison would be blind to the EMA"


def test_accumulated_fsdp_steps_equal_the_large_batch_steps(exact_runs):
    """2 micro-batches of 4 per rank, the gradient reduce-scatter paused for the first, against batch 8."""
    large, accumulated = (torch.load(consolidated(exact_runs[name] / "checkpoints" / "last.ckpt"),
                                     map_location="cpu", weights_only=True) for name in ("fsdp", "fsdp_accumulated"))
    assert accumulated["global_step"] == large["global_step"] == 3
    _assert_states(accumulated["state_dict"], large["state_dict"], close=True)


def test_the_checkpoint_is_sharded_and_the_ranks_agree(exact_runs):
    shards = sorted((exact_runs["fsdp"] / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert [s.name for s in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [s.stat().st_size for s in shards]  # weights + SGD momentum; a replicated tensor is saved once
    assert min(sizes) > 0.35 * sum(sizes), sizes  # each rank holds about half: neither holds it all
    result = json.loads((exact_runs["fsdp"] / "result.json").read_text())
    assert result["status"] == "completed" and result["ddp"]["world_size"] == 2
    assert len(set(result["ddp"]["teacher_sha256"])) == 1


def test_eval_reads_the_consolidated_export(exact_runs):
    run_dir = exact_runs["fsdp"]
    out = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "eval", "knn", str(run_dir), "--no-cache"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert f"top-1 {result['metrics']['knn_top1']:.2f}%" in out.stdout
    assert (run_dir / "checkpoints" / "last-consolidated.ckpt").is_file()


def test_preempted_fsdp_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_tree):
    adamw = {"trainer": {"max_steps": 6}, "eval": {"knn_init": False}, "optim": {"epochs": 2}}
    whole = tree_for(tiny_tree, tmp_path / "whole", "fsdp", adamw)
    train(tmp_path, whole, "whole")
    cut = tree_for(tiny_tree, tmp_path / "cut", "fsdp", adamw)
    out = train(tmp_path, cut, "cut", preempt_step=3)
    assert "preempted at step 3" in out.stdout
    assert json.loads((run_dir_of(cut) / "result.json").read_text())["status"] == "preempted"
    resumed = train(tmp_path, cut, "cut")
    assert "resuming" in resumed.stdout and "from step 3" in resumed.stdout, resumed.stdout[-2000:]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for tree, name in ((whole, "whole"), (cut, "cut")):
        dcp_to_torch_save(run_dir_of(tree) / "checkpoints" / "last.ckpt", tmp_path / f"{name}.pt")
        states.append(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    a, b = states
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    optimizer = [k for k in a if k.startswith("optimizer_")]
    assert optimizer and all(same(a[k], b[k]) for k in optimizer)  # AdamW moments and step counts
    record = json.loads((run_dir_of(cut) / "result.json").read_text())
    assert record["status"] == "completed" and record["timing"]["train_steps"] == 6
    assert record["resumes"][0]["from_step"] == 3


def same(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_what_fsdp_does_not_support_is_an_error_before_the_run(tiny_tree):
    fsdp = config_lib.deep_merge(tiny_tree, {"trainer": {"strategy": "fsdp"}})
    with pytest.raises(config_lib.ConfigError, match=r"trainer.precision=16-mixed with trainer.strategy=fsdp: .*"
                                                     r"use bf16-mixed or 32-true"):
        config_lib.build_config(fsdp, {"trainer": {"precision": "16-mixed"}})
    with pytest.raises(config_lib.ConfigError, match=r"backbone.sync_batchnorm=true with trainer.strategy=fsdp"):
        config_lib.build_config(fsdp, {"backbone": {"name": "resnet18", "sync_batchnorm": True}})
    with pytest.raises(config_lib.ConfigError, match=r"trainer.strategy.*'fsdp2'.*ddp, fsdp|ddp, fsdp.*fsdp2"):
        config_lib.build_config(fsdp, {"trainer": {"strategy": "fsdp2"}})
    assert config_lib.build_config(fsdp, {"trainer": {"precision": "bf16-mixed"}}).trainer.strategy == "fsdp"


def test_an_incomplete_sharded_last_ckpt_falls_back_to_previous(exact_runs, tmp_path):
    """A sharded last.ckpt without its index (a save cut short) is passed over for previous.ckpt."""
    import shutil

    from ssl_bench.run import evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(exact_runs["fsdp"], run_dir)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last-consolidated.ckpt").unlink(missing_ok=True)
    shutil.copytree(checkpoints / "last.ckpt", checkpoints / "previous.ckpt")
    (checkpoints / "last.ckpt" / ".metadata").unlink()
    target = evaluate.open_target(str(run_dir))
    assert Path(target.info.path).name == "previous-consolidated.ckpt"
    assert not (checkpoints / "last-consolidated.ckpt").exists()
    (checkpoints / "previous.ckpt" / ".metadata").unlink()
    (checkpoints / "previous-consolidated.ckpt").unlink()
    with pytest.raises(config_lib.ConfigError, match="cannot consolidate"):
        evaluate.open_target(str(run_dir))
