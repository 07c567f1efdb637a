"""``torchrun --nproc-per-node 2 -m ssl_bench.cli eval ...`` on a run: the two ranks form one gloo group.

k-NN and the linear probe (sharded protocols) give the numbers of a one-process evaluation of the same
checkpoint, and their record says 2 ranks; the collapse protocol (not sharded) runs on rank 0 while
rank 1 waits. Rank 0 alone writes records and prints the table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from ssl_bench import config as config_lib
from ssl_bench.run import evaluate, train
from tests.conftest import TINY

LINEAR = ["linear.lrs=[0.01,0.1]", "linear.epochs=1", "linear.augment=false", "linear.batch_size=16",
          "linear.test_subset=17"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun_eval")
    cfg = config_lib.build_config(config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(root / "runs")},
                                                               "eval": {"test_subset": 17}}))
    result = train.run(cfg)
    assert result.status == "completed"
    return result.run_dir


def free_port() -> int:
    with socket.socket() as s:  # torchrun's static rendezvous needs a real port (0 is not resolved)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "ssl_bench.cli", "eval", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def records(run_dir, kind: str) -> dict[int, dict]:
    """This kind's records by the number of ranks that computed them."""
    found = [json.loads(p.read_text()) for p in (run_dir / "evals").glob(f"{kind}-*.json")]
    by_ranks = {r["protocol"].get("ranks", 1): r for r in found}
    assert len(by_ranks) == len(found), "two records with the same number of ranks"
    return by_ranks


@pytest.mark.parametrize("kind, overrides", [("knn", ["--no-cache"]), ("linear", LINEAR)])
def test_two_ranks_give_the_one_process_numbers(run_dir, kind, overrides):
    out = torchrun(kind, str(run_dir), *overrides)
    assert out.stdout.count("record:") == 1, out.stdout  # rank 0 prints; rank 1 does not
    single = evaluate.evaluate(evaluate.open_target(str(run_dir), [o for o in overrides if "=" in o]), kind,
                               torch.device("cpu"), **({"no_cache": True} if kind == "knn" else {}))
    assert single.protocol["ranks"] == 1
    both = records(run_dir, kind)
    assert set(both) == {1, 2}
    assert both[2]["metrics"] == pytest.approx(single.metrics, abs=1e-9)
    assert both[2]["metrics"] == pytest.approx(both[1]["metrics"], abs=1e-9)
    result = json.loads((run_dir / "result.json").read_text())
    assert {both[1]["eval_id"], both[2]["eval_id"]} <= set(result["evals"])


def test_a_protocol_that_does_not_shard_runs_on_rank_0(run_dir):
    out = torchrun("collapse", str(run_dir), "--batches", "1")
    assert out.stdout.count("rankme") == 1, out.stdout  # shown once, by rank 0
    (record,) = (run_dir / "evals").glob("collapse-*.json")
    assert json.loads(record.read_text())["metrics"]["rankme"] > 0
