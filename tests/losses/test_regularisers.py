"""Sinkhorn-Knopp marginals, KoLeo on hand-computable points, iBOT loss only on masked patches."""

import math

import pytest
import torch

from ssl_bench.losses import ibot_masked_patch_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp


def _logits(b, k, seed=0):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed))


def test_sinkhorn_rows_are_distributions_and_columns_approach_b_over_k():
    x = _logits(12, 4) * 3
    for iters in (1, 3, 50):
        q = sinkhorn_knopp(x, 0.1, iters)
        assert q.dtype == torch.float32 and q.shape == (12, 4) and (q >= 0).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(12))
    col_err = {it: (sinkhorn_knopp(x, 1.0, it).sum(dim=0) - 12 / 4).abs().max().item() for it in (1, 3, 200)}
    softmax_err = (torch.softmax(x / 1.0, dim=1).sum(dim=0) - 3).abs().max().item()
    assert col_err[200] < 1e-4 < col_err[3] < softmax_err  # 3 iterations balance part of the way
    assert col_err[3] < col_err[1]


def test_sinkhorn_ignores_a_constant_shift_and_accepts_half_precision():
    x = _logits(6, 5)
    torch.testing.assert_close(sinkhorn_knopp(x + 40.0, 0.04), sinkhorn_knopp(x, 0.04))
    assert torch.isfinite(sinkhorn_knopp(x * 100, 0.01)).all()  # exp overflow is avoided
    assert sinkhorn_knopp(x.half(), 0.1).dtype == torch.float32


def test_sinkhorn_of_one_prototype_dominating_spreads_the_mass():
    x = torch.zeros(8, 4)
    x[:, 0] = 5.0  # every sample prefers prototype 0: centering-free softmax would collapse
    q = sinkhorn_knopp(x, 0.1, 100)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 2.0), atol=1e-3, rtol=0)


def test_koleo_on_hand_computed_points():
    # a=(1,0), b=(0.6,0.8), c=(0,1): |ab|=sqrt(0.8), |bc|=sqrt(0.4), |ac|=sqrt(2).
    # Nearest neighbours: a->b, b->c, c->b, so loss = -(ln sqrt(.8) + 2 ln sqrt(.4)) / 3.
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    expected = -(math.log(math.sqrt(0.8)) + 2 * math.log(math.sqrt(0.4))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)
    assert koleo_loss(x * torch.tensor([[5.0], [0.1], [2.0]])).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_pushes_close_points_apart():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]], requires_grad=True)
    koleo_loss(x).backward()
    # the two near-duplicates are pushed away from each other along the second coordinate
    assert x.grad[0, 1] > 0 > x.grad[1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.ones(1, 3))


def _hand_ibot(student, teacher, masks, temp):
    """Loops over images and patches with math.log: an independent computation."""
    total = 0.0
    for b in range(masks.shape[0]):
        idx = [n for n in range(masks.shape[1]) if masks[b, n]]
        per_image = 0.0
        for n in idx:
            logits = [v / temp for v in student[b, n].tolist()]
            lse = math.log(sum(math.exp(v) for v in logits))
            per_image += -sum(p * (v - lse) for p, v in zip(teacher[b, n].tolist(), logits))
        total += per_image / max(len(idx), 1)
    return total / masks.shape[0]


def test_ibot_loss_matches_hand_computation_and_ignores_unmasked_patches():
    student = _logits(6, 4, seed=1).reshape(2, 3, 4)
    teacher = torch.softmax(_logits(6, 4, seed=2), dim=-1).reshape(2, 3, 4)
    masks = torch.tensor([[True, False, True], [False, False, False]])
    loss = ibot_patch_loss(student, teacher, masks, 0.1)
    assert loss.item() == pytest.approx(_hand_ibot(student, teacher, masks, 0.1), rel=1e-5)
    changed = student.clone()
    changed[0, 1] += 10.0
    changed[1] -= 3.0  # unmasked patches and the unmasked image do not matter
    assert ibot_patch_loss(changed, teacher, masks, 0.1).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[0, 2, 0] += 1.0  # a masked patch does
    assert ibot_patch_loss(changed, teacher, masks, 0.1).item() != pytest.approx(loss.item(), rel=1e-3)
    masked = ibot_masked_patch_loss(student[masks], teacher[masks], masks, 0.1)
    assert masked.item() == pytest.approx(loss.item(), rel=1e-6)


def test_ibot_loss_weights_each_image_equally():
    # image 0 has 1 masked patch, image 1 has 3; each image's mean counts once
    student = torch.zeros(2, 3, 2)
    teacher = torch.tensor([[1.0, 0.0]]).expand(2, 3, 2).clone()
    student[0, 0] = torch.tensor([0.0, 1.0])  # CE = log(1 + e^10) - 0 for this patch at temp 0.1
    masks = torch.tensor([[True, False, False], [True, True, True]])
    ce_hard = math.log(1 + math.exp(10.0))
    expected = (ce_hard + math.log(2.0)) / 2
    assert ibot_patch_loss(student, teacher, masks, 0.1).item() == pytest.approx(expected, rel=1e-5)
