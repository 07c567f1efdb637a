"""Collapse diagnostics on hand-computable inputs, and the collapse flag's window."""

import math

import pytest
import torch

from ssl_bench.eval.collapse import (REASON_ENTROPY_UNIFORM, REASON_ENTROPY_ZERO, REASON_KL_ZERO, CollapseMonitor,
                                     feature_std, kl_teacher_student, rankme, target_entropy)


def test_entropy_of_uniform_one_hot_and_a_two_point_distribution():
    assert target_entropy(torch.full((3, 8), 1 / 8)) == pytest.approx(math.log(8), abs=1e-6)
    assert target_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.25, 0.75]])
    assert target_entropy(p) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def test_kl_over_cross_view_pairs():
    t = [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])]
    # student view 1 is uniform, view 0 is softmax([ln 9, 0] * 0.1 / 0.1) = (0.9, 0.1), view 2 uniform
    s = [torch.tensor([[math.log(9.0) * 0.1, 0.0]]), torch.zeros(1, 2), torch.zeros(1, 2)]
    kl = kl_teacher_student(t, s, 0.1)

    def kl_(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    pairs = [kl_([0.5, 0.5], [0.5, 0.5]), kl_([0.5, 0.5], [0.5, 0.5]),  # teacher 0 vs students 1, 2
             kl_([0.9, 0.1], [0.9, 0.1]), kl_([0.9, 0.1], [0.5, 0.5])]  # teacher 1 vs students 0, 2
    assert kl == pytest.approx(sum(pairs) / 4, abs=1e-6)
    assert kl_teacher_student([t[0]], [t[0].log(), t[0].log()], 1.0) == pytest.approx(0.0, abs=1e-6)


def test_rankme_of_full_rank_and_rank_one_embeddings():
    assert rankme(torch.eye(5) * 3) == pytest.approx(5.0, rel=1e-4)
    assert rankme(torch.ones(10, 4)) == pytest.approx(1.0, rel=1e-3)
    # singular values (2, 1): p = (2/3, 1/3), exp(H(p)) by hand
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert rankme(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(math.exp(h), rel=1e-4)


def test_feature_std_is_zero_for_identical_and_positive_for_spread_features():
    assert feature_std(torch.ones(6, 3) * torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.0, abs=1e-6)
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # std per dim (unbiased): sqrt(2), 0
    assert feature_std(spread) == pytest.approx(math.sqrt(2) / 2, abs=1e-6)


def test_monitor_needs_a_sustained_window_and_records_its_first_step():
    # log 100 = 4.605: entropy <= 0.461 is "dominated", >= 4.513 is "uniform"
    m = CollapseMonitor(num_prototypes=100, entropy_low=0.1, entropy_high=0.98, kl_threshold=0.03, window=3)
    log_k = math.log(100)
    assert m.signs(0.45, 1.0) == [REASON_ENTROPY_ZERO] and m.signs(0.47, 1.0) == []
    assert m.signs(log_k - 0.05, 0.02) == [REASON_ENTROPY_UNIFORM, REASON_KL_ZERO]
    assert m.signs(log_k - 0.1, 0.04) == []
    assert m.signs(2.0, 0.5) == []
    history = [(0, 2.0, 0.5), (10, 0.05, 0.5), (20, 0.05, 0.5), (30, 2.0, 0.5),  # streak broken at 30
               (40, 0.01, 0.5), (50, 0.01, 0.5)]
    assert not any(m.update(*h) for h in history)
    assert m.update(60, 0.02, 0.5)
    assert (m.collapsed_step, m.reason) == (40, REASON_ENTROPY_ZERO)
    assert m.update(70, 2.0, 0.5)  # once collapsed, the flag stays
    assert m.summary()["collapse_step"] == 40 and m.summary()["collapsed"]


# Recorded trajectories (step, teacher entropy, KL) of ResNet-18 DINO runs on Fashion-MNIST, K = 1024
# (log K = 6.931), from metrics.jsonl (2026-12-06). A healthy DINO arm of the ResNet collapse study
# (dino-a8497253, its k-NN kept rising) sits at 98.1-98.4% of log K with KL >= 0.06 for 50 steps; the
# stride-2 stem of search round 3, uniform for all 312 steps (dino-23306645 at lr 2e-3, dino-168ee944 at
# 5e-4), passes 99%.
HEALTHY_DINO = [(0, 5.636, 1.036), (10, 6.149, 0.594), (20, 6.417, 0.358), (30, 6.656, 0.195),
                (40, 6.752, 0.128), (50, 6.799, 0.099), (60, 6.805, 0.082), (70, 6.818, 0.082),
                (80, 6.819, 0.069), (90, 6.806, 0.063)]
STEM_LR_2E3 = [(0, 5.738, 0.833), (10, 6.431, 0.391), (20, 6.696, 0.194), (30, 6.83, 0.087),
               (40, 6.876, 0.044), (50, 6.891, 0.026), (60, 6.896, 0.021), (70, 6.902, 0.016), (80, 6.908, 0.013)]
STEM_LR_5E4 = [(50, 6.803, 0.107), (60, 6.828, 0.084), (70, 6.849, 0.066), (80, 6.867, 0.052),
                (90, 6.877, 0.043), (100, 6.88, 0.04), (110, 6.886, 0.038), (120, 6.886, 0.036),
                (130, 6.89, 0.033)]


def _verdict(history, entropy_high):
    m = CollapseMonitor(num_prototypes=1024, entropy_high=entropy_high)
    for h in history:
        m.update(*h)
    return m.collapsed_step, m.reason


def test_the_default_uniform_bound_flags_a_healthy_resnet_dino_run_and_0_99_does_not():
    assert _verdict(HEALTHY_DINO, 0.98) == (50, REASON_ENTROPY_UNIFORM)  # why the ResNet studies set 0.99
    assert _verdict(HEALTHY_DINO, 0.99) == (None, None)
    assert _verdict(STEM_LR_2E3, 0.99) == (40, REASON_ENTROPY_UNIFORM)
    assert _verdict(STEM_LR_5E4, 0.99) == (80, REASON_ENTROPY_UNIFORM)


# ---- non-finite inputs: an error with counts, never a NaN diagnostic --------------------------------------

def _bad(n=6, d=4, nan_at=((1, 2),), inf_at=()):
    x = torch.rand(n, d) + 0.1
    for r, c in nan_at:
        x[r, c] = math.nan
    for r, c in inf_at:
        x[r, c] = math.inf
    return x


@pytest.mark.parametrize("fn,default", [(target_entropy, "collapse diagnostics: teacher targets"),
                                        (rankme, "collapse diagnostics: RankMe embeddings"),
                                        (feature_std, "collapse diagnostics: feature-std features")])
def test_single_tensor_diagnostics_raise_with_counts(fn, default):
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    x = _bad(nan_at=((1, 2), (1, 3), (4, 0)), inf_at=((5, 1),))
    with pytest.raises(NonFiniteFeaturesError, match=rf"^{default}: 3 of 6 rows \(samples\) hold NaN or inf "
                                                     r"\(3 NaN and 1 inf among 24 values\)"):
        fn(x)
    with pytest.raises(NonFiniteFeaturesError, match=r"^collapse diagnostics: teacher CLS: 6 of 6 rows .*"
                                                     r"\(24 NaN and 0 inf"):
        fn(torch.full((6, 4), math.nan), what="collapse diagnostics: teacher CLS")


def test_rankme_of_nan_raises_instead_of_failing_inside_the_svd():
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    with pytest.raises(NonFiniteFeaturesError, match="1 of 6 rows"):
        rankme(_bad())
    assert rankme(torch.eye(5) * 3) == pytest.approx(5.0, rel=1e-4)  # finite input: as before


def test_kl_raises_on_non_finite_teacher_targets_or_student_logits():
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    good_t = [torch.full((3, 4), 0.25), torch.full((3, 4), 0.25)]
    good_s = [torch.zeros(3, 4) for _ in range(4)]
    bad_t = [good_t[0], _bad(3, 4, nan_at=((0, 0), (2, 1)))]
    with pytest.raises(NonFiniteFeaturesError, match=r"^collapse diagnostics: teacher targets of 2 views: 2 of 6 "
                                                     r"rows \(samples\) hold NaN or inf \(2 NaN and 0 inf among 24"):
        kl_teacher_student(bad_t, good_s, 0.1)
    bad_s = good_s[:3] + [_bad(3, 4, nan_at=(), inf_at=((1, 1),))]
    with pytest.raises(NonFiniteFeaturesError, match=r"^collapse diagnostics: student logits of 4 views: 1 of 12 "
                                                     r"rows .*\(0 NaN and 1 inf among 48"):
        kl_teacher_student(good_t, bad_s, 0.1)
    assert kl_teacher_student(good_t, good_s, 0.1) == pytest.approx(0.0, abs=1e-6)
