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


def test_per_phase_restarts_the_schedule_at_the_gan_phase():
    from gan_core.schedules import phased_lr_factor

    cfg = ScheduleSection(lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.05, per_phase=True)
    pretrain = [phased_lr_factor(s, 150, cfg, gan_start=100) for s in range(100)]
    gan = [phased_lr_factor(s, 150, cfg, gan_start=100) for s in range(100, 150)]
    assert pretrain[9] == pytest.approx(1.0) and pretrain[-1] == pytest.approx(0.05, abs=1e-3)
    assert gan[0] == pytest.approx(0.1) and gan[9] == pytest.approx(1.0)  # its own warmup, to the full base LR
    assert gan[-1] == pytest.approx(lr_factor(49, 50, cfg))
    # one schedule over the run: by the GAN phase the cosine sits near its floor (what left D untrained)
    whole = ScheduleSection(lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.05)
    assert max(phased_lr_factor(s, 150, whole, gan_start=100) for s in range(100, 150)) < 0.35
    assert [phased_lr_factor(s, 150, whole, 100) for s in range(150)] == [lr_factor(s, 150, whole) for s in range(150)]


def test_per_phase_milestones_count_from_the_phase_start_and_gan_scale():
    from gan_core.schedules import phased_lr_factor

    cfg = ScheduleSection(lr_schedule="multistep", milestones=[20], gamma=0.5, per_phase=True)
    assert [phased_lr_factor(s, 100, cfg, gan_start=50, gan_lr_scale=0.1) for s in (19, 20, 49, 50, 69, 70)] == \
        pytest.approx([1.0, 0.5, 0.5, 0.1, 0.1, 0.05])
    # a pixel-only run (the GAN phase "starts" at the end) follows one schedule over the run
    assert phased_lr_factor(30, 100, cfg, gan_start=100) == pytest.approx(0.5)


def test_built_schedulers_follow_the_phases():
    from gan_core.build import build_state
    from tests.gan_core.conftest import tiny_config

    cfg = tiny_config(train={"total_steps": 10, "pretrain_steps": 6},
                      schedule={"lr_schedule": "cosine", "warmup_steps": 2, "per_phase": True, "gan_g_lr_scale": 0.5})
    state = build_state(cfg, torch.device("cpu"))
    g_lrs, d_lrs = [], []
    for _ in range(10):
        g_lrs.append(state.g_optimizer.param_groups[0]["lr"])
        d_lrs.append(state.d_optimizer.param_groups[0]["lr"])
        state.g_optimizer.step(), state.d_optimizer.step()
        state.g_scheduler.step(), state.d_scheduler.step()
    assert g_lrs[1] == pytest.approx(1e-3) and g_lrs[7] == pytest.approx(0.5e-3)  # G: 0.5 x g_lr after its warmup
    assert d_lrs[6] == pytest.approx(0.5e-3) and d_lrs[7] == pytest.approx(1e-3)  # D: the full d_lr in the GAN phase
