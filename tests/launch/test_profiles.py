"""Cluster profiles and plan-time resource validation (no SLURM needed; sinfo is faked on PATH)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from ssl_bench import config as config_lib
from ssl_bench.launch import profiles
from ssl_bench.launch.jobs import distributed_env
from ssl_bench.launch.profiles import Limits, Profile, check_run, load_profile

REPO = Path(__file__).resolve().parents[2]


def cfg_with(**dotted):
    return config_lib.load_config(None, [f"{k}={v}" for k, v in dotted.items()])


def test_shipped_profiles_load():
    names = profiles.available_profiles(REPO / "slurm" / "profiles")
    assert {"local-test", "example-gpu"} <= set(names)
    gpu = load_profile("example-gpu", REPO / "slurm" / "profiles")
    assert gpu.gpus_per_node == 8 and gpu.limits.gpus_per_node == 8
    params = gpu.sbatch_parameters(nodes=2, tasks_per_node=8)
    assert params["mem"] == "491520M" and params["partition"] == "gpu" and "account" not in params


def test_unknown_profile_key_names_file_and_valid_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("partiton: gpu\n")
    with pytest.raises(config_lib.ConfigError, match=r"unknown key\(s\) \['partiton'\]; did you mean 'partition'") as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and "cpus_per_task" in str(err.value)
    path.write_text("limits: {cpus: 4}\n")
    with pytest.raises(config_lib.ConfigError, match=r"limits.cpus.*limits.cpus_per_node"):
        load_profile(str(path))
    path.write_text("time_min: 0\n")
    with pytest.raises(config_lib.ConfigError, match="time_min must be an integer >= 1"):
        load_profile(str(path))


def test_missing_profile_lists_available(tmp_path):
    (tmp_path / "a.yaml").write_text("{}\n")
    with pytest.raises(config_lib.ConfigError, match="'nope' not found.*available profiles: a"):
        load_profile("nope", tmp_path)


def test_check_run_rejects_impossible_requests():
    limits = Limits(nodes=2, cpus_per_node=8, gpus_per_node=4, mem_gb_per_node=100, time_min=120)
    gpu = Profile(name="g", gpus_per_node=4, cpus_per_task=2, mem_gb=50, time_min=60)
    ok = cfg_with(**{"trainer.accelerator": "gpu", "trainer.devices": 4, "trainer.num_nodes": 2})
    assert check_run(ok, gpu, limits, "r", train_size=60000) == [
        "r: data.num_workers=2 loader processes + the training process share cpus_per_task=2 CPU(s)"]
    cases = {
        "trainer.devices=2 GPU processes per node need gpus_per_node=2": {"trainer.accelerator": "gpu",
                                                                          "trainer.devices": 2},
        "trainer.num_nodes=3 but the partition has 2": {"trainer.accelerator": "gpu", "trainer.devices": 4,
                                                        "trainer.num_nodes": 3},
        "runs on CPU, but the profile requests 4 GPU": {},
    }
    for message, keys in cases.items():
        with pytest.raises(config_lib.ConfigError, match=message):
            check_run(cfg_with(**keys), gpu, limits, "r", train_size=60000)
    cpu = Profile(name="c", cpus_per_task=3, time_min=200)
    with pytest.raises(config_lib.ConfigError, match="exceeds the partition's limit of 120") as err:
        check_run(cfg_with(**{"trainer.devices": 4}), cpu, limits, "r", train_size=60000)
    assert "4 task(s) x cpus_per_task=3 = 12 CPUs per node requested; nodes have 8" in str(err.value)


def test_check_run_batch_against_training_set():
    cfg = cfg_with(**{"trainer.devices": 2, "data.batch_size": 64})
    profile = Profile(cpus_per_task=4)
    check_run(cfg, profile, Limits(), "r", train_size=128)  # 64 images per process: exactly one batch
    with pytest.raises(config_lib.ConfigError, match="each process gets only 63 of the 127 training images"):
        check_run(cfg, profile, Limits(), "r", train_size=127)


def test_slurm_time_and_gres_parsing():
    assert profiles._minutes("1-02:03:00") == 1440 + 123
    assert profiles._minutes("30:00") == 30 and profiles._minutes("infinite") is None
    assert profiles._minutes("00:00:30") == 1
    assert profiles._gpus("gpu:a100:8(S:0-1)") == 8 and profiles._gpus("(null)") == 0
    assert profiles._gpus("gpu:2,gpu:tesla:2") == 4


@pytest.fixture
def fake_sinfo(tmp_path, monkeypatch):
    """A `sinfo` that prints a fixed partition table for any arguments."""
    script = tmp_path / "bin" / "sinfo"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\ncase \"$*\" in *-p\\ missing*) exit 0;; *%P) echo 'debug* gpu'; exit 0;; esac\n"
                      "echo 'gpu|3|64|512000|gpu:h100:8(S:0-1)|2-00:00:00'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def test_partition_limits_from_sinfo(fake_sinfo):
    live = profiles.partition_limits("gpu")
    assert live == Limits(nodes=3, cpus_per_node=64, gpus_per_node=8, mem_gb_per_node=500.0, time_min=2880)
    merged = profiles.effective_limits(Profile(limits=Limits(nodes=2, time_min=5000)), live)
    assert merged.nodes == 2 and merged.time_min == 2880  # the tighter of profile and sinfo
    with pytest.raises(config_lib.ConfigError, match="partition 'missing' does not exist.*available: debug, gpu"):
        profiles.partition_limits("missing")


def test_distributed_env_from_allocation():
    env = distributed_env({"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env == {"MASTER_ADDR": "n1", "MASTER_PORT": str(20000 + 12345 % 20000)}
    assert distributed_env({"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "gpu[07,09]", "MASTER_ADDR": "x"}) == {
        "MASTER_PORT": "20003"}
    assert distributed_env({}) == {}
    for nodelist, first in (("gpu[07,09]", "gpu07"), ("a[3-4],b[1-2]", "a3"), ("node1,node2", "node1"),
                            ("n[001-004]", "n001"), ("solo", "solo")):  # Lightning's parser, as SLURM lists nodes
        assert distributed_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": nodelist})["MASTER_ADDR"] == first


def test_profile_fields_documented_in_example():
    text = (REPO / "slurm" / "profiles" / "example-gpu.yaml").read_text()
    missing = [f.name for f in dataclasses.fields(Profile) if f.name not in ("source",) and f"{f.name}:" not in text]
    assert not missing, f"example-gpu.yaml does not show {missing}"
