"""Real data: a short DINO run on a Fashion-MNIST subset must beat its own random initialisation."""

import pytest

from ssl_bench import config as config_lib
from ssl_bench.run import train


@pytest.mark.slow
def test_dino_on_fashion_mnist_beats_random_init(tmp_path):
    """ResNet-18 teacher, 138 steps on 3000 images (about 4 minutes on 2 CPU cores).

    Measured here: k-NN top-1 26.2% at init, 65.3% after training. A BN network
    scored in eval mode before any training has uncalibrated running statistics,
    so part of this gain comes from the BN statistics that training sets, not only
    from what DINO learns. A ViT needs far more steps to beat its own init: 59.9% ->
    65.7% after 937 steps (experiments/fashion_mnist_dino_long.yaml, 32 minutes),
    and within ±3 points either way at 80-500 steps, which is why it is not used here.
    """
    cfg = config_lib.load_config("experiments/fashion_mnist_dino.yaml", [
        "backbone.name=resnet18", "backbone.drop_path_rate=0",
        "data.subset=3000", "optim.epochs=3", "optim.warmup_epochs=0.5", "method.freeze_last_layer_epochs=0.5",
        "eval.bank_subset=5000", "eval.test_subset=1000", "tracking.progress_bar=false",
        f"tracking.runs_root={tmp_path}"])
    result = train.run(cfg)
    m = result.metrics
    print(f"knn_top1={m['knn_top1']:.2f} knn_top1_init={m['knn_top1_init']:.2f}")
    assert m["knn_top1"] > m["knn_top1_init"] + 10.0
