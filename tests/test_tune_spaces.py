"""Every space in tune_spaces/ loads, validates against its recipe, and says how to run it; a distribution
must fit the schema type of its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gan_core.config import ConfigError, known_keys
from jobs.sweeps.space import (
    Distribution,
    PbtScheduler,
    build_param_space,
    check_distribution_type,
    check_samples,
    key_annotation,
    load_space,
    resolve_base_config,
)

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


def test_every_schema_key_has_a_type():
    assert {key for key in known_keys() if key_annotation(key) is None} == set()
    assert key_annotation("schedule.warmup_steps") is int and key_annotation("nope.key") is None


FITS = [  # (key, distribution): every sample is a value the key's type takes
    ("optim.g_lr", {"loguniform": [1e-5, 1e-3]}),
    ("generator.res_scale", {"uniform": [0.1, 0.5]}),
    ("generator.res_scale", {"randint": [0, 1]}),           # an int is a fine float
    ("schedule.warmup_steps", {"randint": [0, 100]}),
    ("schedule.restart_period", {"randint": [10, 100]}),    # int | None
    ("optim.grad_clip", {"uniform": [0.5, 5.0]}),           # float | None
    ("generator.scale", {"choice": [2, 4]}),                # choices are checked value by value elsewhere
]
MISFITS = [  # (key, distribution, what the error must say)
    ("schedule.warmup_steps", {"uniform": [0, 10]}, ("schedule.warmup_steps is an integer key, but uniform samples "
                                                      "floats (0..10): the edges pass the schema and every trial that "
                                                      "samples a fraction fails; use {randint: [0, 10]}")),
    ("schedule.restart_period", {"loguniform": [10, 1000]}, "use {randint: [10, 1000]} or a choice of values"),
    ("train.total_steps", {"uniform": [100.5, 100.9]}, "use randint with integer bounds"),
    ("generator.scale", {"randint": [1, 4]}, "generator.scale takes only the values [1, 2, 4]"),
    ("schedule.lr_schedule", {"uniform": [0, 1]}, "use {choice: [...]} with some of them"),
    ("schedule.milestones", {"randint": [1, 5]}, "schedule.milestones takes list values"),
]


@pytest.mark.parametrize(("key", "dist"), FITS, ids=[f"{k}-{next(iter(d))}" for k, d in FITS])
def test_distribution_that_fits_its_key_type_is_accepted(key, dist):
    check_distribution_type(key, Distribution.model_validate(dist))


@pytest.mark.parametrize(("key", "dist", "message"), MISFITS, ids=[f"{k}-{next(iter(d))}" for k, d, _ in MISFITS])
def test_distribution_whose_samples_its_key_refuses_is_an_error(key, dist, message):
    with pytest.raises(ValueError) as raised:
        check_distribution_type(key, Distribution.model_validate(dist))
    assert message in str(raised.value)


def test_space_file_names_the_misfit_before_any_edge_check(tmp_path):
    """The edges of uniform [0, 10] (0.0 and 10.0) are valid ints: only the type check catches it."""
    base = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
    path = tmp_path / "space.yaml"
    path.write_text(f"base: {base}\nparam_space:\n  schedule.warmup_steps: {{uniform: [0, 10]}}\n")
    with pytest.raises(ConfigError, match=r"param_space: schedule.warmup_steps is an integer key.*randint: \[0, 10\]"):
        load_space(path)
