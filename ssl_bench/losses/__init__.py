"""Pure loss functions and their small explicit state objects."""

from ssl_bench.losses.centering import Centering, NoCentering
from ssl_bench.losses.dino import dino_cross_entropy, teacher_targets
from ssl_bench.losses.ibot import ibot_masked_patch_loss, ibot_patch_loss
from ssl_bench.losses.koleo import koleo_loss
from ssl_bench.losses.sinkhorn import sinkhorn_knopp

__all__ = ["Centering", "NoCentering", "dino_cross_entropy", "ibot_masked_patch_loss", "ibot_patch_loss",
           "koleo_loss", "sinkhorn_knopp", "teacher_targets"]
