"""DINO's uniform-target fixed point: the monitors that show it, and the contrastive warm-up that leaves it."""

import numpy as np
import pytest
import torch

from braindino import monitors
from braindino.losses import SimCLRLoss
from braindino.train.config import load_config
from braindino.train.dino import DINOObjective
from braindino.train.schedules import build_schedules, hold_then_fade


def test_hold_then_fade_holds_then_falls_linearly_to_zero():
    np.testing.assert_array_equal(hold_then_fade(2.0, 3, 4, 10), [2, 2, 2, 2, 1.5, 1, 0.5, 0, 0, 0])
    np.testing.assert_array_equal(hold_then_fade(0.5, 2, 0, 4), [0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(hold_then_fade(1.0, 0, 0, 3), [0, 0, 0])


def test_contrastive_share_reaches_the_schedules_and_is_off_by_default():
    assert not build_schedules(load_config(None, ["optim.iters=5"])).contrastive_share.any()
    config = load_config(None, ["optim.iters=6", "contrastive_warmup.iters=2", "contrastive_warmup.fade_iters=2"])
    schedules = build_schedules(config)
    assert [schedules.at(step)["contrastive_share"] for step in range(6)] == [1, 1, 1, 0.5, 0, 0]


def _outputs(n_global=2, batch=6, k=16, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = n_global * batch
    bottleneck = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    student = {"cls": torch.randn(rows, 12, generator=generator), "dino_global": torch.randn(rows, k, generator=generator),
               "bottleneck_global": bottleneck, "dino_local": None, "ibot": None}
    teacher = {"dino": torch.randn(rows, k, generator=generator), "ibot": None}
    return student, teacher


def test_contrastive_warm_start_cross_fades_simclr_on_the_global_crops_bottlenecks_into_dino():
    config = load_config(None, ["dino.n_prototypes=16", "ibot.loss_weight=0", "contrastive_warmup.temperature=0.3"])
    objective = DINOObjective(config)
    student, teacher = _outputs()
    without, terms_without, _ = objective(student, teacher, None, 0.05, 2, 0.0)
    total, terms, extra = objective(student, teacher, None, 0.05, 2, 0.7)
    alone, _, _ = objective(student, teacher, None, 0.05, 2, 1.0)
    assert "contrastive" not in terms_without
    first, second = student["bottleneck_global"][:6], student["bottleneck_global"][6:]
    expected = SimCLRLoss(temperature=0.3)(first, second)
    assert torch.equal(terms["contrastive"], expected)
    torch.testing.assert_close(total, 0.3 * without + 0.7 * expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, expected, rtol=0, atol=0)
    assert torch.equal(extra["teacher_logits"], teacher["dino"])


def test_logit_spread_is_the_mean_over_prototypes_of_the_std_across_rows():
    logits = torch.tensor([[0.0, 1.0, 5.0], [2.0, 1.0, 1.0], [4.0, 1.0, 3.0]])
    assert monitors.logit_spread(logits) == pytest.approx((2.0 + 0.0 + 2.0) / 3)
    with pytest.raises(ValueError):
        monitors.logit_spread(logits[:1])


def test_top_direction_share_is_one_for_rank_one_rows_and_spreads_for_isotropic_ones():
    direction = torch.randn(1, 32)
    rank_one = torch.randn(64, 1) * direction + torch.randn(1, 32)    # rows differ only along `direction`
    assert monitors.top_direction_share(rank_one) == pytest.approx(1.0, abs=1e-5)
    isotropic = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    assert monitors.top_direction_share(isotropic) == pytest.approx(1 / 8, abs=0.02)
    two = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert monitors.top_direction_share(two) == pytest.approx(9 / 10)


def test_fixed_point_watch_warns_once_after_its_patience_and_restarts_when_the_run_leaves():
    watch = monitors.FixedPointWatch(patience=100)
    assert watch.update(50, 0.4, 0.95) is None           # enters the regime at step 50
    assert watch.update(100, 0.4, 0.95) is None          # 50 steps in
    assert watch.update(150, 1.2, 0.95) is None          # left it (spread above the temperature): count restarts
    assert watch.update(200, 0.4, 0.99) is None
    assert watch.update(250, 0.4, 0.85) is None          # left it (no dominant direction)
    assert watch.update(300, 0.5, 0.97) is None
    line = watch.update(400, 0.5, 0.97)
    assert line.startswith("warning: step 400") and "100 steps" in line
    assert watch.update(500, 0.5, 0.97) is None          # once
    assert monitors.FixedPointWatch(patience=0).update(10_000, 0.0, 1.0) is None
