"""Real data: a short DINO run on a Fashion-MNIST subset must beat its own random initialisation."""

import pytest

from ssl_bench import config as config_lib
from ssl_bench import train


@pytest.mark.slow
def test_dino_on_fashion_mnist_beats_random_init(tmp_path):
    cfg = config_lib.load_config("experiments/fashion_mnist_dino.yaml", [
        "data.subset=3000", "optim.epochs=3", "optim.warmup_epochs=0.5", "method.freeze_last_layer_epochs=0.5",
        "eval.bank_subset=5000", "eval.test_subset=1000", "tracking.progress_bar=false",
        f"tracking.runs_root={tmp_path}"])
    result = train.run(cfg)
    m = result.metrics
    print(f"knn_top1={m['knn_top1']:.2f} knn_top1_init={m['knn_top1_init']:.2f}")
    assert m["knn_top1"] > m["knn_top1_init"] + 1.0
