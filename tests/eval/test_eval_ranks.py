"""Evaluation protocols on 2 gloo ranks == the same protocols in one process, with the work split.

One module-scoped fixture spawns 2 CPU ranks (``tests/gloo_ranks.py``). Each rank runs the linear
probe (fast and augment mode) and the k-NN protocol on the same seeded tiny ViT, first alone (the
single-process reference) and then inside the process group, counting the images its backbone
forwards. The test split has 17 images in batches of 16, so its last batch of 1 gives rank 1 an
empty slice. Inside the group each rank forwards only its slice of every batch (about half the
images), and the all-gathered features rebuild the single process's batches, so fast-mode
linear heads and k-NN land on the same numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_bench import config as config_lib
from ssl_bench import dist
from ssl_bench.backbones.timm_backbone import build_backbone
from ssl_bench.eval import linear
from ssl_bench.eval.knn_protocol import run_knn
from tests.conftest import TINY
from tests.gloo_ranks import run_ranks

WORLD = 2
TEST_IMAGES = 17  # batches of 16: the last batch has one image, so rank 1's slice of it is empty


def _cfg(augment: bool) -> config_lib.Config:
    return config_lib.build_config(config_lib.deep_merge(TINY, {
        "backbone": {"depth": 2},
        "linear": {"epochs": 2, "batch_size": 16, "train_subset": 60, "test_subset": TEST_IMAGES,
                   "augment": augment, "lrs": [0.01, 0.1, 1.0]},
        "eval": {"bank_subset": 40, "test_subset": TEST_IMAGES, "batch_size": 16, "knn_k": [5, 10],
                 "knn_report_k": 10}}))


def _compute(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(False).backbone).eval()
    seen = []
    backbone.model.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    out: dict[str, Any] = {"rank": dist.rank(), "world": dist.world_size()}
    for augment in (False, True):
        torch.manual_seed(1 + rank)  # augment mode: each rank's crops come from its own RNG
        seen.clear()
        result = linear.linear_probe(backbone, _cfg(augment))
        out[f"linear_{augment}"] = {"grid": result.grid, "chosen": result.chosen, "protocol": result.protocol,
                                    "forwarded": sum(seen)}
    cfg = _cfg(False)
    loader = linear._loader(cfg, linear.probe_test_set(cfg), False)
    feats, labels = linear.extract_all(backbone, loader, [linear.FeatureChoice(2, True)], "cpu")
    out["test_features"] = {"cls": feats.cls_blocks, "mean": feats.mean_patch, "labels": labels}
    seen.clear()
    knn = run_knn(cfg, backbone, log=lambda line: None)
    out["knn"] = {"metrics": knn.metrics, "ranks": knn.protocol["ranks"], "forwarded": sum(seen)}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return run_ranks(_compute, tmp_path_factory.mktemp("eval_ranks"), WORLD)


def test_ranks_formed_a_group(ranks):
    assert [r["local"]["world"] for r in ranks] == [1, 1]
    assert [(r["distributed"]["rank"], r["distributed"]["world"]) for r in ranks] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("kind", ["linear_False", "linear_True", "knn"])
def test_each_rank_forwards_about_half_of_the_images(ranks, kind):
    alone = [r["local"][kind]["forwarded"] for r in ranks]
    shared = [r["distributed"][kind]["forwarded"] for r in ranks]
    assert alone[0] == alone[1] > 0
    assert sum(shared) == alone[0], (shared, alone)  # every image forwarded exactly once over the ranks
    assert max(shared) - min(shared) <= alone[0] // 10, shared


def test_gathered_features_are_the_single_process_features_in_order(ranks):
    local = ranks[0]["local"]["test_features"]
    assert local["cls"].shape == (TEST_IMAGES, 2, 32) and local["mean"].shape == (TEST_IMAGES, 32)
    for r in ranks:
        got = r["distributed"]["test_features"]
        torch.testing.assert_close(got["cls"], local["cls"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["mean"], local["mean"], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["labels"], local["labels"])
    assert not torch.allclose(local["cls"][:8], local["cls"][8:16])  # rows differ: an order mix-up would show


def test_fast_mode_linear_probe_equals_the_single_process_probe(ranks):
    local = ranks[0]["local"]["linear_False"]
    assert local["protocol"]["ranks"] == 1
    for r in ranks:
        got = r["distributed"]["linear_False"]
        assert got["protocol"]["ranks"] == WORLD
        assert {k: v for k, v in got["protocol"].items() if k != "ranks"} == \
            {k: v for k, v in local["protocol"].items() if k != "ranks"}
        assert [(h["name"], h["val_top1"], h["test_top1"]) for h in got["grid"]] == \
            [(h["name"], h["val_top1"], h["test_top1"]) for h in local["grid"]]
        assert got["chosen"] == local["chosen"]


def test_augment_mode_runs_sharded_with_the_same_protocol(ranks):
    """Crops come from each rank's RNG, so the numbers are not the single process's; the protocol is."""
    local = ranks[0]["local"]["linear_True"]
    for r in ranks:
        got = r["distributed"]["linear_True"]
        assert got["protocol"]["ranks"] == WORLD and got["protocol"]["mode"] == "augment"
        assert got["protocol"]["train_size"] == local["protocol"]["train_size"]
        assert len(got["grid"]) == len(local["grid"]) and 0 <= got["chosen"]["test_top1"] <= 100
    assert ranks[0]["distributed"]["linear_True"]["chosen"] == ranks[1]["distributed"]["linear_True"]["chosen"]


def test_knn_equals_the_single_process_knn(ranks):
    local = ranks[0]["local"]["knn"]
    for r in ranks:
        got = r["distributed"]["knn"]
        assert got["ranks"] == WORLD and local["ranks"] == 1
        assert got["metrics"] == pytest.approx(local["metrics"], abs=1e-9)


def test_launcher_ranks_read_srun_and_torchrun_variables():
    assert dist.launcher_ranks("slurm", {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}) == (3, 4, 1)
    assert dist.launcher_ranks("torchrun", {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 0)
    assert dist.launcher_ranks("torchrun", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (0, 1, 0)
    assert dist.launcher_ranks("slurm", {}) == (0, 1, 0)


def test_joining_needs_a_rendezvous_address(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="2 slurm tasks but no MASTER_ADDR or MASTER_PORT"):
        dist.join_launched_group("slurm", torch.device("cpu"))
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: no group, the device as given
    assert dist.join_launched_group("slurm", torch.device("cpu")) == torch.device("cpu") and not dist.is_distributed()
