"""GPU checks (``pytest -m gpu``): skipped cleanly without CUDA; ``tests/gpu_checks.sh`` runs them on a device.

What CPU tests cannot see: fp16 and bf16 autocast on CUDA kernels, the GradScaler's skipped steps
on a GPU, k-NN on the device against the CPU, NCCL, ``torch.compile`` against eager, and the speed
of a paper recipe (``bench train`` of the DINO ViT-S/16 recipe in bf16 on synthetic crops).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from ssl_bench import config as config_lib
from ssl_bench import dist
from ssl_bench.run import speed
from ssl_bench.run import train
from ssl_bench.eval.knn import knn_accuracies
from ssl_bench.losses import Centering
from ssl_bench.methods import base, build_method

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]


def _gpu_cfg(tiny_tree, **overrides):
    tree = config_lib.deep_merge(tiny_tree, {"trainer": {"accelerator": "gpu", "devices": 1, "max_steps": -1},
                                             "optim": {"epochs": 2}, "train": {"diagnostics_every_n_steps": 2}})
    return config_lib.build_config(tree, overrides)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_steps_are_finite_under_mixed_precision(tiny_tree, method, precision):
    cfg = _gpu_cfg(tiny_tree, method={"name": method}, trainer={"precision": precision},
                   eval={"knn_every_n_epochs": 1})  # init, online and final k-NN on the GPU
    result = train.run(cfg)
    assert result.status == "completed"
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert ("fp16_skipped_steps" in result.timing) == (precision == "16-mixed")
    assert result.metrics["knn_top1"] == result.metrics["knn_top1"]  # a number, computed on the GPU


def test_clip_sees_unscaled_gradients_on_cuda(tiny_tree, monkeypatch):
    """The fp16 clip sees the fp32 gradient norms (within fp16 tolerance), for the fused optimizer."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision
    from torch.utils.data import DataLoader

    from tests.methods.test_methods import _crops

    seen = []
    real = base.clip_per_parameter

    def recording(params, max_norm):
        seen.append(torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).cpu())
        return real(params, max_norm)

    monkeypatch.setattr(base, "clip_per_parameter", recording)
    cfg = config_lib.build_config(tiny_tree, {"method": {"freeze_last_layer_epochs": 0}})
    torch.manual_seed(0)
    method = build_method(cfg)
    speed.apply(method, cfg)
    twin = copy.deepcopy(method)
    loader = DataLoader([(_crops(cfg), torch.zeros(4))], batch_size=None)
    for module, extra in ((method, {"precision": "32-true"}),
                          (twin, {"plugins": [MixedPrecision("16-mixed", "cuda",
                                                             torch.amp.GradScaler("cuda", init_scale=8.0))]})):
        L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, **extra).fit(module, loader)
    fp32, fp16 = seen
    assert_close(fp16, fp32, rtol=0.05, atol=1e-3 * float(fp32.max()))
    assert twin.finite.skipped_steps() == 0


def test_knn_on_gpu_equals_cpu():
    g = torch.Generator().manual_seed(0)
    bank, test = torch.randn(5000, 64, generator=g), torch.randn(500, 64, generator=g)
    bank_labels, test_labels = torch.randint(0, 10, (5000,), generator=g), torch.randint(0, 10, (500,), generator=g)
    cpu = knn_accuracies(bank, bank_labels, test, test_labels, [10, 20], 0.07, 10, 256)
    gpu = knn_accuracies(bank.cuda(), bank_labels.cuda(), test.cuda(), test_labels.cuda(), [10, 20], 0.07, 10, 256,
                         fp16_bank=True)
    for k in (10, 20):  # fp16 bank: a tie may flip an answer or two in 500
        assert abs(cpu[k]["top1"] - gpu[k]["top1"]) <= 0.4


def test_nccl_world_size_one(tmp_path):
    import torch.distributed as torch_dist

    torch_dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                                  timeout=datetime.timedelta(seconds=60))
    try:
        x = torch.arange(6.0, device="cuda").reshape(3, 2)
        assert torch.equal(dist.all_gather_cat(x), x)
        assert dist.all_reduce_sum(torch.ones(2, device="cuda")).tolist() == [1.0, 1.0]
        centering = Centering(2, 0.9).to("cuda")
        centering.update(x)  # all-reduced batch mean over NCCL
        assert_close(centering.center, 0.1 * x.mean(0, keepdim=True))
    finally:
        torch_dist.destroy_process_group()


def test_compile_equals_eager(tiny_tree):
    losses = {}
    for compiled in (False, True):
        cfg = _gpu_cfg(tiny_tree, speed={"compile": compiled}, tracking={"runs_root": str(Path(
            tiny_tree["tracking"]["runs_root"]) / f"compile-{compiled}")}, eval={"knn": False})
        result = train.run(cfg)
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = torch.tensor([x["train/loss"] for x in lines if "train/loss" in x])
    assert_close(losses[True], losses[False], rtol=1e-3, atol=1e-4)


def test_bench_train_vits16_recipe_bf16(tmp_path):
    """Speed of the DINO ViT-S/16 recipe: img/s, memory per image and MFU (figures, no timed assertion)."""
    out = Path(os.environ.get("SSL_BENCH_GPU_OUT", tmp_path))
    cmd = [sys.executable, "-m", "ssl_bench.cli", "bench", "train", "experiments/recipes/dino_vits16_100ep.yaml",
           "--synthetic", "--steps", "10", "--warmup", "3", "--out-dir", str(out),
           "trainer.precision=bf16-mixed", "trainer.accelerator=gpu", "trainer.devices=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(done.stdout[-4000:], done.stderr[-4000:])
    assert done.returncode == 0
    record = json.loads(sorted(out.glob("train-*.json"))[-1].read_text())
    run = record["runs"][0]
    assert run["images_per_s"] > 0 and run["mfu"] is not None and run["peak_memory_mb"] > 0
