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


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows `lr_factor`; call `.step()` once per G step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Change the base LR of a scheduled optimizer (PBT), keeping the schedule's shape and position."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor


def _cosine_between(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
