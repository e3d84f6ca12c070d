"""Per-iteration schedules, precomputed as arrays indexed by the global step.

Precomputing makes resuming trivial (the step is the whole state) and every value loggable.
"""

from dataclasses import dataclass

import numpy as np


def cosine_schedule(start: float, end: float, iters: int, warmup_iters: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """``[iters]`` float64: linear warmup ``warmup_start → start`` over ``warmup_iters`` steps, then a half-cosine
    ``start → end`` over the remaining steps: ``end + (start - end) * (1 + cos(pi * t / T)) / 2``."""
    warmup_iters = min(warmup_iters, iters)
    warmup = np.linspace(warmup_start, start, warmup_iters, endpoint=False)
    t = np.arange(iters - warmup_iters)
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, decay])


def scaled_lr(base_lr: float, global_batch_size: int, rule: str) -> float:
    """Learning rate for a global batch, from ``base_lr`` defined at a batch of 1024 images."""
    ratio = global_batch_size / 1024
    if rule == "sqrt":
        return base_lr * ratio ** 0.5
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"lr_scaling must be sqrt, linear or none, got {rule!r}")


@dataclass
class Schedules:
    lr: np.ndarray               # [iters] peak-scaled learning rate (before per-group multipliers)
    weight_decay: np.ndarray     # [iters]
    teacher_momentum: np.ndarray  # [iters] EMA momentum, cosine to momentum_end
    teacher_temp: np.ndarray     # [iters] linear warmup, then constant
    contrastive_share: np.ndarray    # [iters] weight of the contrastive warm start (1 - it: of DINO's terms)

    def at(self, step: int) -> dict:
        return {"lr": float(self.lr[step]), "weight_decay": float(self.weight_decay[step]),
                "teacher_momentum": float(self.teacher_momentum[step]),
                "teacher_temp": float(self.teacher_temp[step]),
                "contrastive_share": float(self.contrastive_share[step])}


def hold_then_fade(value: float, hold_iters: int, fade_iters: int, iters: int) -> np.ndarray:
    """``[iters]`` float64: ``value`` for ``hold_iters`` steps, then linearly to 0 over ``fade_iters`` steps (the
    first fading step still above 0, the last at ``value / fade_iters``), then 0."""
    step = np.arange(iters, dtype=np.float64)
    return value * np.clip((hold_iters + fade_iters - step) / max(fade_iters, 1), 0.0, 1.0)


def build_schedules(config) -> Schedules:
    """Schedules for a resolved training config (see ``braindino.train.config.DEFAULTS``)."""
    optim, teacher = config.optim, config.teacher
    iters = int(optim.iters)
    peak_lr = scaled_lr(optim.base_lr, optim.global_batch_size, optim.lr_scaling)
    temp_warmup = min(int(teacher.temp_warmup_iters), iters)
    teacher_temp = np.concatenate([
        np.linspace(teacher.temp_warmup_start, teacher.temp, temp_warmup, endpoint=False),
        np.full(iters - temp_warmup, teacher.temp),
    ])
    return Schedules(
        lr=cosine_schedule(peak_lr, optim.min_lr, iters, int(optim.warmup_iters)),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, iters),
        teacher_momentum=cosine_schedule(teacher.momentum, teacher.momentum_end, iters),
        teacher_temp=teacher_temp,
        contrastive_share=hold_then_fade(1.0, int(config.contrastive_warmup.iters),
                                         int(config.contrastive_warmup.fade_iters), iters),
    )
