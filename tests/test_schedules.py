import math

import numpy as np
import pytest

from braindino.train.config import load_config
from braindino.train.schedules import build_schedules, cosine_schedule, scaled_lr


def test_cosine_schedule_matches_hand_values():
    values = cosine_schedule(1.0, 0.0, iters=6, warmup_iters=2, warmup_start=0.0)
    # warmup 0, 0.5; then cosine over 4 steps: t=0..3 of T=4
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    np.testing.assert_allclose(values, expected)


def test_cosine_schedule_without_warmup_starts_at_start_and_decreases():
    values = cosine_schedule(0.996, 1.0, iters=100)
    assert values[0] == pytest.approx(0.996)
    assert np.all(np.diff(values) >= 0) and values[-1] < 1.0


@pytest.mark.parametrize("rule,expected", [("sqrt", 0.004 * 0.5), ("linear", 0.004 * 0.25), ("none", 0.004)])
def test_lr_scaling_rules(rule, expected):
    assert scaled_lr(0.004, 256, rule) == pytest.approx(expected)


def test_build_schedules_from_config():
    config = load_config(None, ["optim.iters=50", "optim.warmup_iters=10", "optim.global_batch_size=256",
                                "optim.base_lr=0.004", "teacher.temp_warmup_iters=20", "teacher.temp=0.07",
                                "teacher.temp_warmup_start=0.04"])
    schedules = build_schedules(config)
    assert len(schedules.lr) == len(schedules.teacher_temp) == 50
    assert schedules.lr[0] == 0.0 and schedules.lr[10] == pytest.approx(0.002)
    assert schedules.teacher_temp[0] == pytest.approx(0.04)
    assert schedules.teacher_temp[10] == pytest.approx(0.055)
    assert np.all(schedules.teacher_temp[20:] == 0.07)
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] < 0.2
    assert schedules.at(10)["lr"] == pytest.approx(0.002)
