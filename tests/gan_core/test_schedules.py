import pytest
import torch

from gan_core.config import ScheduleSection
from gan_core.schedules import LR_SCHEDULES, build_lr_scheduler, lr_factor, set_base_lr


def test_warmup_then_constant():
    cfg = ScheduleSection(lr_schedule="constant", warmup_steps=4)
    assert [lr_factor(s, 100, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_ends_at_floor():
    cfg = ScheduleSection(lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_cosine_restarts_go_back_up():
    cfg = ScheduleSection(lr_schedule="cosine_restarts", restart_period=10)
    assert lr_factor(9, 100, cfg) < 0.1
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)


def test_multistep():
    cfg = ScheduleSection(lr_schedule="multistep", milestones=[10, 20], gamma=0.5)
    assert [lr_factor(s, 100, cfg) for s in (0, 10, 19, 20)] == [1.0, 0.5, 0.5, 0.25]


def test_one_cycle_rises_then_falls():
    cfg = ScheduleSection(lr_schedule="one_cycle")
    values = [lr_factor(s, 100, cfg) for s in range(101)]
    peak = max(range(101), key=values.__getitem__)
    assert 25 <= peak <= 35 and values[0] < 0.1 and values[-1] < 0.01


def test_every_schedule_is_positive():
    for name in LR_SCHEDULES:
        cfg = ScheduleSection(lr_schedule=name, milestones=[5])
        assert all(lr_factor(s, 50, cfg) > 0 for s in range(50)), name


def test_set_base_lr_keeps_position():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, ScheduleSection(lr_schedule="multistep", milestones=[2]), 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    set_base_lr(optimizer, scheduler, 4.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0)
