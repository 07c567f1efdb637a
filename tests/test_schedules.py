"""Schedules at known steps; the official per-iteration array is rebuilt here with numpy."""

import math

import numpy as np
import pytest

from ssl_bench import schedules


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
