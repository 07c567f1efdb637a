"""DINO loss, teacher targets and centering against hand-computed values."""

import math

import pytest
import torch

from ssl_bench.losses import Centering, NoCentering, dino_cross_entropy, teacher_targets


def test_dino_cross_entropy_hand_computed():
    # Teacher targets for the 2 global views, student logits for 3 views (B=1, K=2).
    p0, p1 = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    s0 = torch.tensor([[0.0, 0.0]])               # softmax (0.5, 0.5)
    s1 = torch.tensor([[math.log(3.0), 0.0]])     # softmax (0.75, 0.25)
    s2 = torch.tensor([[0.0, math.log(3.0)]])     # softmax (0.25, 0.75)
    # Pairs (i, j != i): (0,1) (0,2) (1,0) (1,2); by hand:
    # CE(p0, s1) = CE(p0, s2) = -(ln .75 + ln .25) / 2 = 0.8369882
    # CE(p1, s0) = ln 2 = 0.6931472;  CE(p1, s2) = -ln .25 = 1.3862944
    expected = (0.8369882 * 2 + 0.6931472 + 1.3862944) / 4
    loss = dino_cross_entropy([p0, p1], [s0, s1, s2], student_temp=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.9383545, abs=1e-6)


def test_dino_cross_entropy_uses_student_temperature_and_batch_mean():
    p = [torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]])]
    s = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
    at_one = dino_cross_entropy(p, s, student_temp=1.0)
    halved = dino_cross_entropy(p, [x * 0.5 for x in s], student_temp=0.5)
    assert halved.item() == pytest.approx(at_one.item(), abs=1e-6)
    # B=2 by hand: pair (0,1): rows CE = [-(.5 ln σ(2) + .5 ln σ(-2)), -ln σ(-1)]; pair (1,0): [ln 2, -(.5 ln σ(1)+.5 ln σ(-1))]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pair01 = (-(0.5 * math.log(sig(2)) + 0.5 * math.log(sig(-2))) - math.log(sig(-1))) / 2
    pair10 = (math.log(2) - (0.5 * math.log(sig(1)) + 0.5 * math.log(sig(-1)))) / 2
    assert at_one.item() == pytest.approx((pair01 + pair10) / 2, abs=1e-6)


def test_teacher_targets_centre_then_sharpen():
    probs = teacher_targets(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.0]), teacher_temp=0.5)
    # (t - c) / T = (0, 4): softmax = (1, e^4) / (1 + e^4)
    assert probs[0, 0].item() == pytest.approx(1 / (1 + math.e ** 4), abs=1e-6)
    assert probs[0, 1].item() == pytest.approx(0.9820138, abs=1e-6)


def test_centering_update_is_ema_of_batch_mean():
    c = Centering(dim=2, momentum=0.9)
    c.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))       # mean (2, 3)
    assert c.center.flatten().tolist() == pytest.approx([0.2, 0.3])
    c.update(torch.tensor([[0.0, 0.0]]))
    assert c.center.flatten().tolist() == pytest.approx([0.18, 0.27])


def test_centering_removes_a_constant_offset_over_time():
    c = Centering(dim=3, momentum=0.9)
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    for _ in range(200):
        c.update(logits)
    probs = teacher_targets(logits, c.center, teacher_temp=1.0)
    # after centering the dominating first dimension no longer dominates the mean target
    assert probs.mean(0)[0].item() < 0.5
    assert teacher_targets(logits, torch.zeros(3), 1.0).mean(0)[0].item() > 0.95


def test_no_centering_never_moves():
    c = NoCentering(dim=2, momentum=0.9)
    c.update(torch.tensor([[1.0, 2.0]]))
    assert c.center.abs().sum().item() == 0.0
