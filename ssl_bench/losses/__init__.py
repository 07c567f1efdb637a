"""Pure loss functions and their small explicit state objects."""

from ssl_bench.losses.centering import Centering, NoCentering
from ssl_bench.losses.dino import dino_cross_entropy, teacher_targets

__all__ = ["Centering", "NoCentering", "dino_cross_entropy", "teacher_targets"]
