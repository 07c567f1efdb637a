"""Shared fixtures: a tiny CPU config on synthetic images."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_bench import config as config_lib

TINY: dict[str, Any] = {
    "data": {"name": "synthetic", "batch_size": 8, "num_workers": 0, "subset": 32,
             "global_crop_size": 16, "local_crop_size": 8, "local_crops_number": 2,
             "eval_resize": 16, "eval_crop_size": 16},
    "backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "img_size": 16, "depth": 1,
                 "kwargs": {"embed_dim": 32, "num_heads": 2}},
    "method": {"out_dim": 64, "head_hidden_dim": 48, "head_bottleneck_dim": 16},
    "optim": {"epochs": 1},
    "eval": {"bank_subset": 64, "test_subset": 32, "batch_size": 32},
    "trainer": {"max_steps": 2},
    "train": {"diagnostics_every_n_steps": 1},
    "tracking": {"progress_bar": False, "log_every_n_steps": 1},
}


@pytest.fixture
def tiny_tree(tmp_path) -> dict[str, Any]:
    """Override tree for a 2-step run on synthetic data writing under tmp_path."""
    return config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(tmp_path / "runs")}})


@pytest.fixture
def tiny_cfg(tiny_tree) -> config_lib.Config:
    return config_lib.build_config(tiny_tree)


@pytest.fixture(autouse=True)
def _folder_index_cache(tmp_path_factory, monkeypatch):
    """Image-folder indexes (data/folder_index.py) go to the session's temporary folder, not ~/.cache."""
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "ssl-bench-cache"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
