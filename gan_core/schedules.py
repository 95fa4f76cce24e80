"""Learning-rate schedules as multiplicative factors of the base LR over the global step.

One `LambdaLR` per optimizer, so a schedule is a pure function of the step: resuming
needs only the step, and PBT can change the base LR without touching the shape.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from gan_core.config import ScheduleSection


def constant(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    return 1.0


def cosine(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / span)
    return _cosine_between(progress, cfg.min_lr_ratio)


def cosine_restarts(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    period = cfg.restart_period or max(1, (total_steps - cfg.warmup_steps) // 4)
    progress = (max(0, step - cfg.warmup_steps) % period) / period
    return _cosine_between(progress, cfg.min_lr_ratio)


def multistep(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    return cfg.gamma ** sum(1 for milestone in cfg.milestones if step >= milestone)


def one_cycle(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    # Up from base/25 over the warmup (30% of the run when none is set), then cosine down to ~0.
    rise = cfg.warmup_steps or max(1, int(0.3 * total_steps))
    if step < rise:
        return 1 / 25 + (1 - 1 / 25) * step / rise
    progress = min(1.0, (step - rise) / max(1, total_steps - rise))
    return _cosine_between(progress, max(cfg.min_lr_ratio, 1e-4))


LR_SCHEDULES: dict[str, Callable[[int, int, ScheduleSection], float]] = {
    "constant": constant,
    "cosine": cosine,
    "cosine_restarts": cosine_restarts,
    "multistep": multistep,
    "one_cycle": one_cycle,
}


def lr_factor(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    """The LR multiplier at `step`: linear warmup (one-cycle has its own), then the named schedule.

    Raises:
        ValueError: unknown schedule name.
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if cfg.lr_schedule != "one_cycle" and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return LR_SCHEDULES[cfg.lr_schedule](step, total_steps, cfg)


def phased_lr_factor(step: int, total_steps: int, cfg: ScheduleSection, gan_start: int = 0,
                     gan_lr_scale: float = 1.0) -> float:
    """The LR multiplier at global `step` of a run whose GAN phase starts at `gan_start`.

    With `cfg.per_phase` (and a GAN phase after some pretraining) the steps before `gan_start` follow the
    schedule over `gan_start` steps and the steps from `gan_start` on follow it afresh over the remaining
    `total_steps - gan_start` (warmup included); otherwise one schedule spans the run. From `gan_start`
    on the factor is multiplied by `gan_lr_scale`.
    """
    if step < gan_start:
        length = gan_start if cfg.per_phase else total_steps
        return lr_factor(step, length, cfg)
    if cfg.per_phase and 0 < gan_start < total_steps:
        return gan_lr_scale * lr_factor(step - gan_start, total_steps - gan_start, cfg)
    return gan_lr_scale * lr_factor(step, total_steps, cfg)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleSection,
    total_steps: int,
    *,
    gan_start: int = 0,
    gan_lr_scale: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows `phased_lr_factor`; call `.step()` once per G step.

    Args:
        optimizer: G's or D's optimizer.
        cfg: the schedule section.
        total_steps: G steps in the run.
        gan_start: the first step of the GAN phase (`train.pretrain_steps`); with `cfg.per_phase` the
            schedule restarts there.
        gan_lr_scale: multiplies the LR from `gan_start` on (G: `cfg.gan_g_lr_scale`; D: 1).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: phased_lr_factor(step, total_steps, cfg, gan_start, gan_lr_scale))


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Change the base LR of a scheduled optimizer (PBT), keeping the schedule's shape and position."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor


def _cosine_between(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
