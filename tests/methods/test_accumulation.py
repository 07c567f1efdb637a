"""``optim.accumulate_grad_batches``: A micro-batches make one step of the A-times larger batch.

DINO's semantics (Caron et al. 2021, Algorithm 1) for a batch split in A: the gradients of the A
micro-batch losses / A sum to the large batch's gradient; then one optimizer step, one center update
with the teacher outputs of the whole batch, one EMA update and one schedule step. The tests compare
with the large batch trained directly, so a per-micro-batch center or EMA update, or an lr scaled with
the micro-batch, would show as a difference far above the float tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml

from ssl_bench import config as config_lib
from ssl_bench import tracking
from ssl_bench.data import Batch, split_batch
from ssl_bench.methods import build_method
from ssl_bench.methods.base import SSLMethod
from ssl_bench.run import train
from tests.test_resume import final_checkpoint, interrupt

# No drop path: its per-sample draws come from the global RNG in a different order for two half batches.
# A large lr, no warmup and a fast teacher make 3 steps move every weight far beyond the tolerance. SGD, not
# AdamW: AdamW turns the float noise of a zero gradient (the qkv key bias) into a step of size lr.
EXACT = {"backbone": {"drop_path_rate": 0.0}, "method": {"freeze_last_layer_epochs": 0, "momentum_teacher": 0.9},
         "optim": {"optimizer": "sgd", "lr": 0.5, "warmup_epochs": 0}, "data": {"subset": 64}, "trainer": {"max_steps": 3}}
TOL = {"rtol": 1e-4, "atol": 1e-6}


def test_split_batch_keeps_each_images_views_and_masks_together():
    images = torch.arange(6.0).view(6, 1, 1, 1)  # the value names the image
    crops = [images.expand(6, 3, 4, 4) + 100 * v for v in range(3)]  # 2 global views, 1 local
    masks = torch.zeros(12, 5, dtype=torch.bool)
    masks[torch.arange(12), torch.arange(12) % 5] = True  # row r of cat(global views) marks patch r % 5
    parts = split_batch(Batch(crops, torch.arange(6), masks), 3)
    assert len(parts) == 3
    for i, part in enumerate(parts):
        mine = [2 * i, 2 * i + 1]
        assert part.labels.tolist() == mine
        assert [part.crops[v][:, 0, 0, 0].tolist() for v in range(3)] == [[m + 100 * v for m in mine] for v in range(3)]
        rows = mine + [6 + m for m in mine]  # the same images in view 0 and view 1
        assert torch.equal(part.masks, masks[rows])
    assert split_batch(Batch(crops, torch.arange(6)), 1)[0].crops is crops
    with pytest.raises(ValueError, match="6 images does not split into 4"):
        split_batch(Batch(crops, torch.arange(6)), 4)


def _fit(cfg: config_lib.Config) -> tuple[torch.nn.Module, L.Trainer]:
    train.quiet_lightning()
    torch.manual_seed(0)
    method = build_method(cfg)
    settings = train.trainer_settings(cfg)
    trainer = L.Trainer(**settings, max_steps=cfg.trainer.max_steps, logger=False, enable_progress_bar=False)
    trainer.fit(method, datamodule=train.build_datamodule(cfg, method))
    return method, trainer


def _state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _assert_states(a: dict, b: dict, close: bool) -> None:
    assert a.keys() == b.keys()
    keys = [k for k in a if k.startswith(("student.", "teacher.", "centering.", "patch_centering."))]
    if close:
        for key in keys:
            torch.testing.assert_close(a[key], b[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    else:
        far = [k for k in keys if not torch.allclose(a[k], b[k], **TOL)]
        assert len(far) > len(keys) // 2, far


@pytest.mark.parametrize("method", ["dino", "ibot"])  # ibot: its patch center sees all masked patches too
def test_accumulated_steps_equal_the_large_batch_steps(tiny_tree, monkeypatch, method):
    tree = config_lib.deep_merge(tiny_tree, {**EXACT, "method": {**EXACT["method"], "name": method}})
    large, large_trainer = _fit(config_lib.build_config(tree, {"data": {"batch_size": 16}}))
    cfg = config_lib.build_config(tree, {"data": {"batch_size": 8}, "optim": {"accumulate_grad_batches": 2}})
    accumulated, trainer = _fit(cfg)
    assert trainer.global_step == large_trainer.global_step == 3
    assert trainer.num_training_batches == large_trainer.num_training_batches == 4  # 64 images / 16 per step
    assert accumulated.total_batch_size() == large.total_batch_size() == 16
    assert accumulated.lr_at(1) == large.lr_at(1)
    _assert_states(_state(accumulated), _state(large), close=True)
    assert float(accumulated.centering.center.abs().sum()) > 0  # the center moved, so its equality means something
    # Negative control: the same accumulation with the lr scaled by the micro-batch is far off.
    monkeypatch.setattr(SSLMethod, "total_batch_size", lambda self: self.cfg.data.batch_size * self.trainer.world_size)
    naive, _ = _fit(cfg)
    _assert_states(_state(naive), _state(large), close=False)


def test_one_center_and_ema_update_per_accumulated_step(tiny_tree, monkeypatch):
    """Counted directly: 3 steps of 2 micro-batches make 3 center updates of 16 rows each and 3 EMA updates."""
    from ssl_bench.methods import dino

    seen: dict[str, list] = {"center_rows": [], "ema": []}
    cfg = config_lib.build_config(config_lib.deep_merge(tiny_tree, EXACT),
                                  {"data": {"batch_size": 8}, "optim": {"accumulate_grad_batches": 2}})
    real_ema = dino.ema_update
    monkeypatch.setattr(dino, "ema_update", lambda t, s, m: (seen["ema"].append(m), real_ema(t, s, m)))
    method = build_method(cfg)
    real_update = method.centering.update
    method.centering.update = lambda logits: (seen["center_rows"].append(logits.shape[0]), real_update(logits))
    train.quiet_lightning()
    trainer = L.Trainer(**train.trainer_settings(cfg), max_steps=3, logger=False, enable_progress_bar=False)
    trainer.fit(method, datamodule=train.build_datamodule(cfg, method))
    assert seen["center_rows"] == [2 * 16] * 3  # 2 global views x 16 images, once per step
    assert seen["ema"] == [method.momentum_at(s) for s in range(3)]


def test_accumulated_run_resumes_to_its_uninterrupted_weights(tiny_tree, monkeypatch, tmp_path):
    """A preemption lands between optimizer steps (a step is one loader batch), so nothing half-accumulated is lost."""
    tree = config_lib.deep_merge(tiny_tree, {"optim": {"epochs": 2, "accumulate_grad_batches": 2},
                                             "trainer": {"max_steps": -1}, "eval": {"knn_init": False},
                                             "train": {"checkpoint_every_n_steps": 1}})
    reference = train.run(config_lib.build_config(tree, {"tracking": {"runs_root": str(tmp_path / "reference")}}))
    cfg = config_lib.build_config(tree)
    assert interrupt(monkeypatch, cfg, 3).step == 3
    result = train.run(cfg)
    record = tracking.read_result(result.run_dir)
    assert record["status"] == "completed" and record["resumes"][0]["from_step"] == 3
    assert record["timing"]["train_steps"] == 4  # 32 images / (8 x 2) = 2 steps per epoch, 2 epochs
    ckpt, ref = final_checkpoint(result.run_dir), final_checkpoint(reference.run_dir)
    assert ckpt["global_step"] == ref["global_step"] == 4
    different = [k for k in ref["state_dict"] if not torch.equal(ckpt["state_dict"][k], ref["state_dict"][k])]
    assert not different, different[:5]
    steps = [line["step"] for line in tracking.read_metrics(result.run_dir) if "train/loss" in line]
    assert steps == [0, 1, 2, 3]  # one line per optimizer step, not per micro-batch


def test_a_subset_too_small_for_one_accumulated_step_is_an_error(tiny_tree):
    with pytest.raises(config_lib.ConfigError, match=r"data.subset=32 gives no training step per epoch: a step "
                                                     r"needs 64 images \(data.batch_size=8 x optim.accumulate_grad"):
        config_lib.build_config(tiny_tree, {"optim": {"accumulate_grad_batches": 8}})  # 8 x 8 > 32 images


@pytest.mark.ddp
def test_two_rank_accumulated_run_equals_the_two_rank_large_batch_run(tmp_path, tiny_tree):
    """2 gloo ranks x 2 micro-batches of 4 against 2 ranks x 8: the same weights, the ranks in sync."""
    base = config_lib.deep_merge(tiny_tree, {**EXACT, "trainer": {"max_steps": 3, "devices": 2},
                                             "eval": {"knn_init": False}})
    runs = {}
    for name, overrides in {"large": {"data": {"batch_size": 8}},
                            "accumulated": {"data": {"batch_size": 4}, "optim": {"accumulate_grad_batches": 2}}}.items():
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump(config_lib.deep_merge(base, overrides)))
        out = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "train", str(cfg_file)], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        (run_dir,) = (tmp_path / "runs" / name).iterdir()
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "completed" and result["timing"]["train_steps"] == 3
        hashes = result["ddp"]["teacher_sha256"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]  # the ranks stayed in sync
        runs[name] = final_checkpoint(run_dir)["state_dict"]
    _assert_states(runs["accumulated"], runs["large"], close=True)


def test_parts_that_see_only_a_micro_batch_are_named(tiny_tree):
    def note(method, **extra):
        tree = config_lib.deep_merge(tiny_tree, {"method": {"name": method}, "optim": {"accumulate_grad_batches": 2},
                                                 "data": {"subset": 64}, **extra})
        return build_method(config_lib.build_config(tree)).accumulation_note()

    assert note("dino") is None and note("ibot") is None  # these steps equal the large batch's (tests above)
    assert note("dinov2") == ("optim.accumulate_grad_batches=2: Sinkhorn-Knopp targets, iBOT's Sinkhorn-Knopp patch "
                              "targets, KoLeo's nearest neighbours see micro-batches of data.batch_size=8 per rank, "
                              "not the whole batch of 16: the step differs from one large-batch step")
    resnet = {"backbone": {"name": "resnet18", "cifar_stem": True, "patch_size": None, "img_size": None, "depth": None}}
    tree = config_lib.deep_merge(tiny_tree, {**resnet, "optim": {"accumulate_grad_batches": 2}, "data": {"subset": 64}})
    tree["backbone"]["kwargs"] = {}
    assert "BatchNorm statistics see micro-batches" in build_method(config_lib.build_config(tree)).accumulation_note()
    assert build_method(config_lib.build_config(tree, {"optim": {"accumulate_grad_batches": 1}})).accumulation_note() \
        is None
