"""Every space in tune_spaces/ loads, validates against its recipe, and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.sweeps.space import PbtScheduler, build_param_space, check_samples, load_space, resolve_base_config

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


def test_the_documented_spaces_ship():
    assert {"esrgan_asha.yaml", "esrgan_pbt.yaml", "demo_asha.yaml"} <= {path.name for path in SPACES}


@pytest.mark.parametrize("path", SPACES, ids=lambda path: path.name)
def test_space_loads_and_every_bound_makes_a_valid_config(path):
    space = load_space(path)
    base = resolve_base_config(space)
    assert check_samples(space, base) >= len(space.searched_keys())
    assert set(build_param_space(space)) == set(space.param_space)
    header = path.read_text().split("\nbase:")[0]
    assert f"python -m jobs.tune --space tune_spaces/{path.name}" in header, "the header comment gives the command"


def test_esrgan_spaces_search_schedules_penalties_and_res_scale():
    asha = load_space(SPACES[0].parent / "esrgan_asha.yaml")
    assert asha.scheduler.name == "asha" and asha.metric == "val/psnr_y"
    assert {"schedule.lr_schedule", "schedule.warmup_steps", "optim.g_lr", "optim.d_lr", "loss.gp_weight",
            "generator.res_scale", "loss.adversarial_weight"} <= set(asha.param_space)
    assert set(asha.param_space["schedule.lr_schedule"].choice) >= {"cosine", "multistep", "one_cycle", "constant"}
    assert asha.overrides["loss.adversarial"] == "wgan"
    pbt = load_space(SPACES[0].parent / "esrgan_pbt.yaml")
    assert isinstance(pbt.scheduler, PbtScheduler)
    assert set(pbt.scheduler.hyperparam_mutations) == {"optim.g_lr", "optim.d_lr", "loss.gp_weight"}
