"""``backbone.sync_batchnorm``: every BatchNorm of student and teacher becomes a SyncBatchNorm (DINO's ResNet recipe).

Official DINO (facebookresearch/dino 7c446df, ``main_dino.train_dino``) calls
``nn.SyncBatchNorm.convert_sync_batchnorm`` on student and teacher when the backbone has BatchNorm,
so the statistics cover the whole batch over all GPUs. ssl-bench passes ``sync_batchnorm`` to
Lightning, which converts the whole LightningModule (both nets) before wrapping it in DDP. torch's
SyncBatchNorm all-gathers statistics with kernels that exist for CUDA only (``aten::batch_norm_stats``
has no CPU kernel), so the multi-rank check is a GPU test (``test_two_gpu_sync_batchnorm_sees_the_whole_batch``,
needs 2 GPUs); on the CPU these tests check the conversion, the checkpoint keys and the errors.
"""

from __future__ import annotations

import datetime
import os

import lightning as L
import pytest
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
import torch

from ssl_bench import config as config_lib
from ssl_bench.methods import build_method
from ssl_bench.run import train

RESNET = {"backbone": {"name": "resnet18", "cifar_stem": True, "patch_size": None, "img_size": None, "depth": None,
                       "kwargs": {}, "drop_path_rate": 0.0},
          "optim": {"optimizer": "sgd"}, "trainer": {"max_steps": 2}}


def _resnet_tree(tiny_tree):
    tree = config_lib.deep_merge(tiny_tree, RESNET)
    tree["backbone"]["kwargs"] = {}  # deep_merge would keep the ViT's embed_dim and num_heads
    return tree


def _resnet_cfg(tiny_tree, **backbone):
    return config_lib.build_config(_resnet_tree(tiny_tree), {"backbone": backbone})


def _ddp_strategy(cfg):
    """The strategy ``train.build_trainer`` would get for 2 processes (built, not launched: no process starts)."""
    train.quiet_lightning()
    return L.Trainer(**{**train.trainer_settings(cfg), "devices": 2}, logger=False).strategy


def _batchnorms(net):
    return [type(m) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_ddp_converts_both_nets_to_sync_batchnorm_and_keeps_plain_checkpoint_keys(tiny_tree):
    """The Trainer gets the flag; its layer sync (what DDP applies before wrapping the module) converts every
    BatchNorm of student and teacher, and the state keys stay those of plain BatchNorm."""
    assert _ddp_strategy(_resnet_cfg(tiny_tree))._layer_sync is None
    cfg = _resnet_cfg(tiny_tree, sync_batchnorm=True)
    layer_sync = _ddp_strategy(cfg)._layer_sync
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    torch.manual_seed(0)
    plain = build_method(cfg)
    plain_keys = set(plain.state_dict())
    synced = layer_sync.apply(plain)
    for net in ("student", "teacher"):  # DINO converts the teacher too: its BN statistics are the batch's
        kinds = _batchnorms(getattr(synced, net))
        assert len(kinds) == 20 and set(kinds) == {torch.nn.SyncBatchNorm}  # resnet18: 1 + 8 blocks x 2 + 3 downsample
    assert set(synced.state_dict()) == plain_keys  # checkpoints and exported backbones load into plain BatchNorm
    reverted = _batchnorms(layer_sync.revert(synced).student)  # what DDP's teardown does at the end of fit
    assert len(reverted) == 20 and torch.nn.SyncBatchNorm not in reverted


def test_sync_batchnorm_without_batchnorm_is_an_error_naming_the_key(tiny_cfg):
    cfg = tiny_cfg
    cfg.backbone.sync_batchnorm = True  # a ViT: LayerNorm only
    with pytest.raises(config_lib.ConfigError, match=r"backbone.sync_batchnorm=true but 'vit_tiny_patch16_224' "
                                                     r"has no BatchNorm layer"):
        train.validate_config(cfg, check_data=False)


def test_sync_batchnorm_on_cpu_processes_is_an_error_before_the_run(tiny_tree):
    with pytest.raises(config_lib.ConfigError, match=r"backbone.sync_batchnorm=true with trainer.accelerator=cpu "
                                                     r"and 2 processes: torch's SyncBatchNorm runs on CUDA GPUs only"):
        config_lib.build_config(_resnet_tree(tiny_tree),
                                {"backbone": {"sync_batchnorm": True}, "trainer": {"devices": 2}})


def _two_gpu_rank(rank: int, store: str, tree: dict, out: str) -> None:
    torch.distributed.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    method = build_method(config_lib.build_config(tree, {"backbone": {"sync_batchnorm": True}}))
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.student.backbone).cuda().train()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    features = net(images[rank * 4:(rank + 1) * 4]).cls
    torch.save(features.cpu(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_sync_batchnorm_sees_the_whole_batch(tiny_tree, tmp_path):
    """Two ranks with 4 images each give the features one BatchNorm over all 8 gives; plain BN per rank does not."""
    tree = _resnet_tree(tiny_tree)
    torch.multiprocessing.spawn(_two_gpu_rank, args=(str(tmp_path / "store"), tree, str(tmp_path)), nprocs=2)
    synced = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    torch.manual_seed(0)
    net = build_method(config_lib.build_config(tree)).student.backbone.cuda().train()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    torch.testing.assert_close(synced, net(images).cls.cpu(), rtol=1e-4, atol=1e-5)
    per_rank = torch.cat([net(images[i * 4:(i + 1) * 4]).cls.cpu() for i in range(2)])
    assert not torch.allclose(synced, per_rank, rtol=1e-4, atol=1e-5)  # the statistics differ per half
