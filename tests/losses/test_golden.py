"""Golden values from the official implementations.

The numbers below were produced once, in a scratch directory outside this repo, by
running the official code on the inputs built by ``_det`` / the helpers in this file
(float32, CPU, torch 2.14.1):

* facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a:
  ``main_dino.DINOLoss.forward`` (loss value, and the ``center`` buffer after the
  forward, which calls ``update_center``). Its ``update_center`` calls
  ``dist.all_reduce`` unconditionally, so it was run in a single-process gloo group
  (world size 1).
* facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0 (no
  torch.distributed, no xformers, so the pure-torch fallbacks ran):
  ``dinov2/loss/dino_clstoken_loss.py`` ``DINOLoss.sinkhorn_knopp_teacher``,
  ``dinov2/loss/koleo_loss.py`` ``KoLeoLoss.forward`` and
  ``dinov2/loss/ibot_patch_loss.py`` ``iBOTPatchLoss.forward`` (``forward_masked``
  gave the identical value).

Inputs come from ``sin`` of an arange in float64, not from torch's RNG, so they are
the same on any torch version or device.
"""

import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ssl_bench.losses import (Centering, dino_cross_entropy, ibot_masked_patch_loss, ibot_patch_loss,
                              koleo_loss, sinkhorn_knopp, teacher_targets)

RTOL = 1e-5


def _det(shape, a, b, scale):
    """Deterministic float32 tensor: ``scale * sin(a * i + b)`` for i = 0, 1, ... in row-major order."""
    n = math.prod(shape)
    x = torch.sin(torch.arange(n, dtype=torch.float64) * a + b) * scale
    return x.reshape(shape).to(torch.float32)


def _close(actual, expected, atol=1e-7):
    assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=RTOL, atol=atol)


# --- DINO (facebookresearch/dino main_dino.DINOLoss) ---------------------------------------
# DINOLoss(out_dim=8, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.04,
#          warmup_teacher_temp_epochs=2, nepochs=10, student_temp=0.1, center_momentum=0.9),
# center starts at zero; call 1: forward(student, teacher, 0); call 2: forward(student2, teacher2, 1).
DINO_V, DINO_B, DINO_K = 4, 3, 8
DINO_LOSS_1 = 23.979902267456055
DINO_CENTER_1 = [-0.005947025027126074, -0.005449718330055475, -0.0034570854622870684, -0.0005158782005310059,
                 0.0025668779853731394, 0.004945321008563042, 0.0059668379835784435, 0.005351140163838863]
DINO_LOSS_2 = 23.38172149658203
DINO_CENTER_2 = [-0.11369342356920242, -0.07906420528888702, -0.007249684538692236, 0.06741848587989807,
                 0.1094079241156578, 0.09900569170713425, 0.04168608412146568, -0.03465764969587326]


def _dino_inputs():
    V, B, K = DINO_V, DINO_B, DINO_K
    student = _det((V * B, K), 0.37, 0.11, 3.0)   # view-major, as the official forward takes it
    teacher = _det((2 * B, K), 0.53, 0.29, 2.0)
    student2 = _det((V * B, K), 0.61, 0.17, 3.0)
    teacher2 = _det((2 * B, K), 0.71, 0.05, 2.0)
    return student, teacher, student2, teacher2


def test_dino_loss_and_center_match_official():
    student, teacher, student2, teacher2 = _dino_inputs()
    centering = Centering(DINO_K, momentum=0.9)
    losses, centers = [], []
    for s, t in ((student, teacher), (student2, teacher2)):
        probs = teacher_targets(t, centering.center, teacher_temp=0.04)
        losses.append(dino_cross_entropy(list(probs.chunk(2)), list(s.chunk(DINO_V)), student_temp=0.1))
        centering.update(t)
        centers.append(centering.center.clone().flatten())
    _close(losses[0], DINO_LOSS_1)
    _close(centers[0], DINO_CENTER_1)
    _close(losses[1], DINO_LOSS_2)   # uses the non-zero center from call 1
    _close(centers[1], DINO_CENTER_2)


# --- Sinkhorn-Knopp (dinov2 DINOLoss.sinkhorn_knopp_teacher, n_iterations=3) -----------------
SINKHORN_LOGITS = dict(shape=(6, 5), a=0.37, b=0.11, scale=3.0)
SINKHORN = {
    0.1: [[2.8595734721109656e-13, 1.6144556980179914e-07, 0.009664426557719707, 0.8247232437133789,
           0.16561216115951538],
          [0.964759349822998, 0.03519398719072342, 4.6677021600771695e-05, 3.2876334987719247e-10,
           1.84577187764201e-16],
          [0.9843937158584595, 0.010176022537052631, 0.002404597820714116, 0.000940767175052315,
           0.0020849646534770727],
          [2.4008683600828582e-18, 7.696653644279072e-13, 4.7170198058665846e-07, 0.005423699505627155,
           0.9945757985115051],
          [0.005904608406126499, 0.49611538648605347, 0.4976251423358917, 0.0003548887325450778,
           1.4457688379820866e-09],
          [0.9997446537017822, 0.0002551717043388635, 1.5254788365837157e-07, 3.475423074328354e-11,
           2.829164413322132e-14]],
    0.07: [[6.997838794357757e-18, 1.6816527337315534e-10, 0.0011168101336807013, 0.8324169516563416,
            0.16646628081798553],
           [0.9987138509750366, 0.0012860246933996677, 9.919065036001484e-08, 5.620282139532674e-15,
            1.309748048635071e-23],
           [0.99969482421875, 0.0002124865131918341, 2.6916837668977678e-05, 9.149504876404535e-06,
            5.651243554893881e-05],
           [1.8195658563840238e-25, 1.948094094599401e-18, 3.589374353296648e-10, 0.0002947928151115775,
            0.9997052550315857],
           [0.006072226911783218, 0.4971664547920227, 0.49674075841903687, 2.0620000213966705e-05,
            8.152804603298036e-13],
           [0.999998927116394, 1.07419748474058e-06, 2.6541930112089496e-11, 2.158281507157932e-16,
            1.651047817453155e-20]],
}


def test_sinkhorn_knopp_matches_official():
    logits = _det(**SINKHORN_LOGITS)
    for teacher_temp, expected in SINKHORN.items():
        _close(sinkhorn_knopp(logits.clone(), teacher_temp, n_iterations=3), expected)


# --- KoLeo (dinov2 KoLeoLoss) ---------------------------------------------------------------
KOLEO = 1.3820456266403198


def test_koleo_loss_matches_official():
    _close(koleo_loss(_det((7, 4), 0.41, 0.23, 1.5)), KOLEO)


# --- iBOT patch loss (dinov2 iBOTPatchLoss(patch_out_dim=6, student_temp=0.1).forward) -------
IBOT = 10.441509246826172


def _ibot_inputs():
    B, N, K = 4, 5, 6
    student = _det((B, N, K), 0.37, 0.11, 3.0)
    teacher_probs = F.softmax(_det((B, N, K), 0.53, 0.29, 2.0), dim=-1)
    masks = torch.tensor([[1, 0, 1, 0, 0],
                          [0, 0, 0, 0, 0],    # an image with no masked patch
                          [1, 1, 1, 1, 1],
                          [0, 0, 0, 1, 0]], dtype=torch.bool)
    return student, teacher_probs, masks


def test_ibot_patch_loss_matches_official():
    student, teacher_probs, masks = _ibot_inputs()
    _close(ibot_patch_loss(student, teacher_probs, masks, student_temp=0.1), IBOT)
    _close(ibot_masked_patch_loss(student[masks], teacher_probs[masks], masks, student_temp=0.1), IBOT)
