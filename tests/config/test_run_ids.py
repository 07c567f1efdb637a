"""Run ids pinned as literals: a schema change that moves a committed run's id fails here.

The literals were computed before ssl_bench/config.py became the ssl_bench/config/ package (issue 17).
If a change must move them, the README says why and the committed tables are regenerated.
"""

from pathlib import Path

import pytest
import yaml

from ssl_bench import config as config_lib
from ssl_bench.launch.grid import load_study

REPO = Path(__file__).resolve().parents[2]

STUDY_RUN_IDS = {
    # The demo moved to ResNet-18 and a short-run recipe in issue 20 (a new study, not a schema change).
    # Issue 20 (item 4): the demo stops its collapsed arms (train.stop_on_collapse), uniform bound 0.99.
    "experiments/demo.yaml": ["dino-0b8caf00", "dino_no_centering-474ca0b3", "dino_no_sharpening-8a6fcf9b"],
    "experiments/fashion_mnist_collapse.yaml": [
        "dino-edb47c96", "dino-5d515864", "dino-9f64ba0d", "dino_no_centering-53499fdf",
        "dino_no_centering-72ba0904", "dino_no_centering-87c296c7", "dino_no_sharpening-68705470",
        "dino_no_sharpening-5aa4d4ab", "dino_no_sharpening-fb3b3df2",
        "dino_no_centering_no_sharpening-5b14ab7f", "dino_no_centering_no_sharpening-8a94a19c",
        "dino_no_centering_no_sharpening-37c14a31", "dino_sinkhorn-78afd9c0", "dino_sinkhorn-a485ce8b",
        "dino_sinkhorn-c90ef4a9",
    ],
    # Issue 20: the collapse study on the demo's ResNet-18 recipe (uniform bound 0.99: README; 468 steps).
    "experiments/fashion_mnist_collapse_resnet.yaml": [
        "dino-c5cf8d1d", "dino-b3929fa6", "dino-cfde9139",
        "dino_no_centering-44129bb7", "dino_no_centering-94eb79cf", "dino_no_centering-70a647d1",
        "dino_no_sharpening-396bcb29", "dino_no_sharpening-253783fa", "dino_no_sharpening-760a316a",
        "dino_no_centering_no_sharpening-b3e1b7ff", "dino_no_centering_no_sharpening-c66be3f6",
        "dino_no_centering_no_sharpening-01bb8f1e",
        "dino_sinkhorn-87380c0a", "dino_sinkhorn-e7c8df28", "dino_sinkhorn-e4d02cfb",
    ],
    # Issue 20 (item 3): the collapse arms on all 60000 images for one epoch (937 steps).
    "experiments/fashion_mnist_collapse_full.yaml": [
        "dino-593ddda3", "dino-25e1e955", "dino-6f311f35",
        "dino_no_centering-210fd58b", "dino_no_centering-60fdd85a", "dino_no_centering-83992155",
        "dino_no_sharpening-31271389", "dino_no_sharpening-7854c88d", "dino_no_sharpening-3ccf0628",
        "dino_no_centering_no_sharpening-7bc08daa", "dino_no_centering_no_sharpening-2baf1267",
        "dino_no_centering_no_sharpening-477bc07c",
    ],
    "experiments/fashion_mnist_dino_search.yaml": ["dino-ecec68fa", "dino-cd6351b2", "dino-d366848d", "dino-830fa99b"],
    "experiments/fashion_mnist_dino_search_stem.yaml": ["dino-698085d1", "dino-4b5c48c9"],
    "experiments/fashion_mnist_dino_search_stem_nostop.yaml": ["dino-23306645", "dino-168ee944"],
    "experiments/fashion_mnist_dino_best.yaml": ["dino-4825a998"],
    "experiments/fashion_mnist_dino_long.yaml": ["dino-01e7f743"],
    "experiments/precision_bf16_cpu.yaml": ["dino-bebe7abb", "dino-53b51dff", "dino-c34feeae", "dino-6b01b812",
                                           "dino-3d2f8855", "dino-3e9ff098"],
    "experiments/recipes/dino_table7_ablation.yaml": [
        "dino-611622af", "dino_no_momentum-7192325d", "dino_sinkhorn-8296d29c", "dino_no_multicrop-23a1d881",
    ],
    "experiments/recipes/dino_table7_no_multicrop.yaml": ["dino_no_multicrop-2be63f97"],
    "experiments/recipes/dino_teacher_temp.yaml": ["dino-b5a85644", "dino-0d915330", "dino-b51c8306", "dino-4a465287"],
    "experiments/recipes/dino_teacher_temp_warmup.yaml": ["dino-9de8c0b4"],
    # Issue 21 (item 3): the same runs as one study file of named arms each (tests/launch/test_study_arms.py).
    "experiments/recipes/dino_table7.yaml": [
        "dino-611622af", "dino_no_momentum-7192325d", "dino_sinkhorn-8296d29c", "dino_no_multicrop-2be63f97",
    ],
    "experiments/recipes/dino_teacher_temp_table.yaml": ["dino-b5a85644", "dino-0d915330", "dino-b51c8306",
                                                         "dino-4a465287", "dino-9de8c0b4"],
}

CONFIG_FILE_RUN_IDS = {
    "experiments/fashion_mnist_dino.yaml": "dino-1e4acb5a",
    "experiments/bench/tiny_cpu_resnet18.yaml": "dino-8640474a",
    "experiments/bench/tiny_cpu_vit.yaml": "dino-059feed6",
    "experiments/recipes/dino_rn50.yaml": "dino-7e3b4906",  # issue 21: sync_batchnorm true (was dino-c7bbddb5)
    "experiments/recipes/dino_vits16_100ep.yaml": "dino-0d915330",
    "experiments/recipes/dino_vits16_300ep_boosted.yaml": "dino-611622af",
    "experiments/recipes/dino_vits16_800ep.yaml": "dino-3abc8760",
    "experiments/recipes/dinov2_vits14.yaml": "dinov2-5f419b3d",
}

DEFAULT_RUN_ID = "dino-1e4acb5a"
OVERRIDE_RUN_IDS = {  # overrides -> run id; those that equal DEFAULT_RUN_ID are unhashed or at their default
    "method.teacher_temp_schedule=per_epoch": "dino-ef5ef10d",
    "method.teacher_temp_schedule=per_step": DEFAULT_RUN_ID,
    "backbone.pos_embed_interpolation=dino": "dino-2f8c4684",
    "backbone.pos_embed_interpolation=timm": DEFAULT_RUN_ID,
    "eval.knn_k=[5] eval.knn_report_k=5": "dino-3f187126",
    "eval.knn_k=[5,20]": "dino-521fbf99",
    "optim.epochs=3": "dino-41d86bec",
    "data.aug.flip_p=0.3": "dino-31e3c23e",
    "method.name=dinov2": "dinov2-f028be4e",
    "seed=1": "dino-a81fa7ab",
    "linear.epochs=3": DEFAULT_RUN_ID,
    "speed.compile=true": DEFAULT_RUN_ID,
    "study=other": DEFAULT_RUN_ID,
    "tracking.runs_root=/x": DEFAULT_RUN_ID,
    "data.num_workers=0": DEFAULT_RUN_ID,
    "train.resume=false": DEFAULT_RUN_ID,
    "eval.knn_every_n_epochs=2": DEFAULT_RUN_ID,
}


@pytest.mark.parametrize("path", sorted(STUDY_RUN_IDS))
def test_committed_study_run_ids_do_not_move(path):
    assert [run.run_id for run in load_study(REPO / path).runs] == STUDY_RUN_IDS[path]


@pytest.mark.parametrize("path", sorted(CONFIG_FILE_RUN_IDS))
def test_committed_config_file_run_ids_do_not_move(path):
    assert config_lib.run_id(config_lib.load_config(REPO / path)) == CONFIG_FILE_RUN_IDS[path]


@pytest.mark.parametrize("overrides", sorted(OVERRIDE_RUN_IDS))
def test_override_run_ids_do_not_move(overrides):
    assert config_lib.run_id(config_lib.load_config(None, overrides.split())) == OVERRIDE_RUN_IDS[overrides]


def test_default_hash_at_other_lengths():
    cfg = config_lib.Config()
    assert config_lib.run_id(cfg) == DEFAULT_RUN_ID
    assert config_lib.config_hash(cfg, 12) == "1e4acb5aaa9f"


def test_config_yaml_keeps_the_declared_key_order_and_round_trips():
    text = config_lib.to_yaml(config_lib.Config())
    tree = yaml.safe_load(text)
    assert list(tree) == ["study", "seed", "data", "backbone", "method", "optim", "eval", "linear", "trainer",
                          "train", "speed", "tracking"]
    assert list(tree["data"])[-1] == "aug" and list(tree["tracking"])[-1] == "wandb_tags"
    assert config_lib.to_yaml(config_lib.from_dict(tree)) == text
