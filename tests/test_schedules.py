"""Schedules at known steps; the official per-iteration array is rebuilt here with numpy."""

import math

import numpy as np
import pytest

from ssl_bench import schedules
from ssl_bench.config import ConfigError, build_config, run_id


def official_style_array(base, final, total, warmup, start=0.0):
    """DINO's utils.cosine_scheduler written out from its definition (not copied)."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    i = np.arange(total - warmup)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / len(i)))])


def test_cosine_matches_official_array_everywhere():
    ref = official_style_array(5e-4, 1e-6, total=50, warmup=10)
    ours = [schedules.cosine(s, 50, 5e-4, 1e-6, warmup_steps=10) for s in range(50)]
    assert np.allclose(ours, ref, rtol=0, atol=1e-12)


def test_cosine_known_values():
    assert schedules.cosine(0, 10, 1.0, 0.0, warmup_steps=2) == 0.0
    assert schedules.cosine(1, 10, 1.0, 0.0, warmup_steps=2) == 1.0
    assert schedules.cosine(2, 10, 1.0, 0.0, warmup_steps=2) == 1.0
    assert schedules.cosine(6, 10, 1.0, 0.0, warmup_steps=2) == pytest.approx(0.5)
    assert schedules.cosine(9, 10, 1.0, 0.0, warmup_steps=2) == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))
    assert schedules.cosine(50, 10, 1.0, 0.0, warmup_steps=2) == schedules.cosine(9, 10, 1.0, 0.0, warmup_steps=2)


def test_teacher_momentum_schedule():
    assert schedules.cosine(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert schedules.cosine(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert schedules.cosine(999, 1000, 0.996, 1.0) == pytest.approx(1.0, abs=1e-7)


def test_teacher_temperature_warmup_is_linspace():
    ref = np.linspace(0.04, 0.07, 30)
    assert schedules.linspace_at(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert schedules.linspace_at(15, 30, 0.04, 0.07) == pytest.approx(ref[15])
    assert schedules.linspace_at(29, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert schedules.linspace_at(100, 30, 0.04, 0.07) == 0.07
    assert schedules.linspace_at(3, 0, 0.04, 0.07) == 0.07


def test_lr_linear_scaling_rule():
    assert schedules.scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert schedules.scaled_lr(5e-4, 64) == pytest.approx(1.25e-4)


def official_teacher_temp_array(start, end, warmup_epochs, nepochs):
    """DINOLoss.teacher_temp_schedule written out from its definition (one value per epoch)."""
    return np.concatenate((np.linspace(start, end, warmup_epochs), np.ones(nepochs - warmup_epochs) * end))


def test_teacher_temp_per_epoch_known_values():
    # 3 warmup epochs 0.04 -> 0.07: 0.04, 0.055, 0.07, then 0.07; 2 steps per epoch.
    expected = [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07]
    ours = [schedules.teacher_temp_per_epoch(s, 2, 3, 0.04, 0.07) for s in range(8)]
    assert ours == pytest.approx(expected, abs=1e-15)
    # numpy.linspace(a, b, 1) == [a]: a one-epoch warmup holds the start value during epoch 0
    assert [schedules.teacher_temp_per_epoch(s, 5, 1, 0.04, 0.07) for s in (0, 4, 5, 99)] == [0.04, 0.04, 0.07, 0.07]
    assert schedules.teacher_temp_per_epoch(0, 5, 0, 0.04, 0.07) == 0.07  # no warmup


@pytest.mark.parametrize("warmup, nepochs, steps_per_epoch", [(30, 100, 7), (2, 4, 3), (1, 3, 2), (0, 5, 4)])
def test_teacher_temp_per_epoch_matches_official_array(warmup, nepochs, steps_per_epoch):
    ref = official_teacher_temp_array(0.04, 0.07, warmup, nepochs)
    ours = [schedules.teacher_temp_per_epoch(s, steps_per_epoch, warmup, 0.04, 0.07)
            for s in range(nepochs * steps_per_epoch)]
    assert np.allclose(ours, np.repeat(ref, steps_per_epoch), rtol=0, atol=1e-15)


def test_teacher_temp_schedule_config_values():
    with pytest.raises(ConfigError, match=r"method.teacher_temp_schedule='epoch'; valid: per_step, per_epoch"):
        build_config({"method": {"teacher_temp_schedule": "epoch"}})
    with pytest.raises(ConfigError, match="method.warmup_teacher_temp_epochs=2.5 must be a whole number"):
        build_config({"method": {"teacher_temp_schedule": "per_epoch", "warmup_teacher_temp_epochs": 2.5}})
    # the default leaves run ids of existing runs as they were; the official schedule is another run
    assert run_id(build_config({"method": {"teacher_temp_schedule": "per_step"}})) == run_id(build_config())
    assert run_id(build_config({"method": {"teacher_temp_schedule": "per_epoch"}})) != run_id(build_config())


def test_linspace_at_is_numpy_linspace_then_end():
    """Every (num, step), one-point warmups included: numpy.linspace(start, end, 1) == [start]."""
    import numpy as np

    for num in range(0, 6):
        expected = list(np.linspace(0.04, 0.07, num)) + [0.07] * 3
        assert [schedules.linspace_at(i, num, 0.04, 0.07) for i in range(num + 3)] == pytest.approx(expected)
    assert schedules.cosine(0, 6, 5e-3, 1e-6, warmup_steps=1) == 0.0  # official cosine_scheduler: lr 0 at step 0
