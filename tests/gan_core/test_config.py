from pathlib import Path

import pytest

from gan_core.config import GPU_DEFAULTS, Config, ConfigError, config_from_dict, flatten, known_keys, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.data.patch_size % cfg.generator.scale == 0


def test_recipes_exist():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"demo", "esrgan_x4_psnr", "esrgan_x4_gan"} <= names


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {g_lr: 1.0e-4}\n")
    cfg = load_config(path, ["optim.g_lr=2e-4", "train.bf16=true", "schedule.milestones=[10, 20]", "generator.scale=2"])
    assert cfg.optim.g_lr == pytest.approx(2e-4)
    assert cfg.train.bf16 is True
    assert cfg.schedule.milestones == [10, 20]
    assert cfg.generator.scale == 2


def test_unknown_key_names_path_and_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim: {g_lrr: 1.0e-4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "optim.g_lrr: unknown key" in message
    assert "g_lr" in message and "d_lr" in message


def test_wrong_type_names_path_and_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {total_steps: many}\n")
    with pytest.raises(ConfigError, match=r"train\.total_steps: .*integer.*'many'"):
        load_config(path)


def test_bad_override_key_fails():
    with pytest.raises(ConfigError, match="data.batchsize: unknown key"):
        config_from_dict({"data": {"batchsize": 3}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="divisible by generator.scale"):
        config_from_dict({"generator": {"scale": 4}, "data": {"patch_size": 66}})
    with pytest.raises(ConfigError, match="pretrain_steps"):
        config_from_dict({"train": {"total_steps": 5, "pretrain_steps": 6}})
    with pytest.raises(ConfigError, match="low 3.0 is above high 1.0"):
        config_from_dict({"data": {"degradation": {"blur_sigma": [3, 1]}}})


def test_flatten_and_known_keys():
    flat = flatten(Config().model_dump())
    assert flat["optim.g_lr"] == 1e-4
    assert {"schedule.lr_schedule", "loss.gp_weight", "generator.res_scale"} <= known_keys()


def test_every_literal_in_the_schema_equals_its_registry():
    import typing

    from gan_core.config import DiscriminatorSection, GeneratorSection, LossSection, ScheduleSection
    from gan_core.losses import ADVERSARIAL_MODES, PIXEL_LOSSES
    from gan_core.losses.perceptual import LPIPS_BACKBONE_FILES
    from gan_core.models import DISCRIMINATORS, GENERATORS
    from gan_core.models.discriminators import _NORMS
    from gan_core.models.rrdb import _UNSHUFFLE_FACTOR, UPSAMPLE_SKIPS
    from gan_core.schedules import LR_SCHEDULES

    def options(section, key):
        return set(typing.get_args(section.model_fields[key].annotation))

    assert options(GeneratorSection, "name") == set(GENERATORS)
    assert options(GeneratorSection, "scale") == set(_UNSHUFFLE_FACTOR)
    assert options(GeneratorSection, "upsample_skip") == set(UPSAMPLE_SKIPS)
    assert options(DiscriminatorSection, "name") == set(DISCRIMINATORS)
    assert options(DiscriminatorSection, "norm") == set(_NORMS)
    assert options(LossSection, "pixel") == set(PIXEL_LOSSES)
    assert options(LossSection, "adversarial") == set(ADVERSARIAL_MODES)
    assert options(LossSection, "lpips_net") == set(LPIPS_BACKBONE_FILES)
    assert options(ScheduleSection, "lr_schedule") == set(LR_SCHEDULES)


def test_config_is_frozen_and_with_values_revalidates():
    from gan_core.config import ConfigError

    cfg = load_config(CONFIG_DIR / "demo.yaml")
    with pytest.raises(ValueError):
        cfg.optim.g_lr = 1.0
    changed = cfg.with_values({"optim.g_lr": 2e-4, "run.name": "x"})
    assert (changed.optim.g_lr, changed.run.name, cfg.run.name) == (2e-4, "x", load_config(CONFIG_DIR / "demo.yaml").run.name)
    with pytest.raises(ConfigError, match="optim.g_lr"):
        cfg.with_values({"optim.g_lr": float("inf")})


def test_gpu_defaults_fill_only_what_the_recipe_and_overrides_leave_unset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  bf16: false\n")
    cpu = load_config(recipe)
    assert (cpu.train.bf16, cpu.train.channels_last, cpu.train.compile, cpu.optim.fused) == (False,) * 4
    gpu = load_config(recipe, ["train.compile=false"], use_gpu=True)
    assert gpu.train.bf16 is False and gpu.train.compile is False  # set by the recipe / the command line
    assert gpu.train.channels_last is True and gpu.optim.fused is True  # GPU_DEFAULTS
    assert set(GPU_DEFAULTS) <= known_keys()
