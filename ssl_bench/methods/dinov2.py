"""DINOv2-style training: DINO + iBOT masked-patch loss + KoLeo + Sinkhorn-Knopp targets, and its ablations.

Oquab et al. 2023 (arXiv 2304.07193), Sec. 4; reference code facebookresearch/dinov2
``train/ssl_meta_arch.py`` (``forward_backward``). iBOT: Zhou et al. 2022. Each method is DINO's
step (``methods/dino.py``) with the parts it names (``methods/parts.py``), so a "minus one"
ablation lists one part fewer. The weights stay config values (``method.ibot_weight``,
``method.koleo_weight``; 0 switches a term off as well).
"""

from __future__ import annotations

from ssl_bench.methods.base import METHODS
from ssl_bench.methods.dino import DINO
from ssl_bench.methods.parts import IBOT, CenteringTargets, IBOTSinkhorn, KoLeo, SinkhornKnoppTargets


@METHODS.register("dinov2", "DINOv2-style: DINO + iBOT masked-patch loss + KoLeo, Sinkhorn-Knopp targets")
class DINOv2(DINO):
    """The student sees masked global views; its patch head predicts the teacher's tokens there."""

    targets, terms = SinkhornKnoppTargets, (IBOTSinkhorn, KoLeo)


@METHODS.register("dinov2_no_koleo", "DINOv2-style minus KoLeo (same as method.koleo_weight=0)")
class DINOv2NoKoLeo(DINO):
    targets, terms = SinkhornKnoppTargets, (IBOTSinkhorn,)


@METHODS.register("dinov2_no_ibot", "DINOv2-style minus the iBOT masked-patch loss (no masks, no mask token)")
class DINOv2NoIBOT(DINO):
    targets, terms = SinkhornKnoppTargets, (KoLeo,)


@METHODS.register("dinov2_no_sinkhorn", "DINOv2-style minus Sinkhorn-Knopp: centering for CLS and patch targets")
class DINOv2NoSinkhorn(DINO):
    targets, terms = CenteringTargets, (IBOT, KoLeo)


@METHODS.register("ibot", "iBOT-style: DINO + masked-patch loss with its own patch center (no KoLeo, no SK)")
class IBOTMethod(DINO):
    """iBOT (Zhou et al. 2022) as DINOv2 runs it: centering for both heads, no KoLeo."""

    targets, terms = CenteringTargets, (IBOT,)
