from pathlib import Path

import pytest

from gan_core.config import Config, ConfigError, config_from_dict, flatten, known_keys, load_config

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
