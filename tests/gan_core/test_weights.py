"""find_weights: search order and the MissingWeightsError message. Never touches the real caches."""

import pytest
import torch

from gan_core.weights import KNOWN_WEIGHTS, MissingWeightsError, find_weights, hub_checkpoint_dir

FILE = "vgg19-dcbbabf1.pth"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Isolated hub cache and weights dir: TORCH_HOME -> tmp, GAN_CORE_WEIGHTS_DIR unset."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GAN_CORE_WEIGHTS_DIR", raising=False)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert hub_checkpoint_dir() == hub  # torch.hub follows $TORCH_HOME
    env = tmp_path / "env_weights"
    explicit = tmp_path / "explicit"
    for d in (hub, env, explicit):
        d.mkdir(parents=True)
    return {"hub": hub, "env": env, "explicit": explicit}


def touch(path):
    path.write_bytes(b"x")
    return path


def test_hub_cache_is_found(dirs):
    hub_file = touch(dirs["hub"] / FILE)
    assert find_weights(FILE) == hub_file


def test_env_dir_beats_hub(dirs, monkeypatch):
    touch(dirs["hub"] / FILE)
    monkeypatch.setenv("GAN_CORE_WEIGHTS_DIR", str(dirs["env"]))
    env_file = touch(dirs["env"] / FILE)
    assert find_weights(FILE) == env_file


def test_explicit_dir_and_file_beat_env(dirs, monkeypatch):
    touch(dirs["hub"] / FILE)
    touch(dirs["env"] / FILE)
    monkeypatch.setenv("GAN_CORE_WEIGHTS_DIR", str(dirs["env"]))
    in_dir = touch(dirs["explicit"] / FILE)
    assert find_weights(FILE, explicit_path=dirs["explicit"]) == in_dir
    renamed = touch(dirs["explicit"] / "my_vgg.pth")  # an explicit file is used whatever its name
    assert find_weights(FILE, explicit_path=str(renamed)) == renamed


def test_explicit_dir_without_the_file_falls_through(dirs):
    hub_file = touch(dirs["hub"] / FILE)
    assert find_weights(FILE, explicit_path=dirs["explicit"]) == hub_file


def test_missing_message_names_file_places_url_and_fixes(dirs, monkeypatch):
    monkeypatch.setenv("GAN_CORE_WEIGHTS_DIR", str(dirs["env"]))
    with pytest.raises(MissingWeightsError) as excinfo:
        find_weights(FILE, explicit_path=dirs["explicit"])
    assert isinstance(excinfo.value, FileNotFoundError)
    msg = str(excinfo.value)
    assert FILE in msg
    for place in (dirs["explicit"] / FILE, dirs["env"] / FILE, dirs["hub"] / FILE):
        assert str(place) in msg
    assert "https://download.pytorch.org/models/vgg19-dcbbabf1.pth" in msg
    assert "GAN_CORE_WEIGHTS_DIR" in msg
    assert "perceptual_weights_path" in msg
    assert "TORCH_HOME" in msg


def test_missing_unknown_file_says_no_url(dirs):
    with pytest.raises(MissingWeightsError, match="No known download URL"):
        find_weights("nonexistent.pth")


def test_known_urls():
    # Drift check: every backbone file the perceptual losses ask for has a known URL to show.
    from gan_core.losses.perceptual import LPIPS_BACKBONE_FILES, VGG19_FILE

    assert {*LPIPS_BACKBONE_FILES.values(), VGG19_FILE} <= set(KNOWN_WEIGHTS)
    for name, url in KNOWN_WEIGHTS.items():
        assert url == f"https://download.pytorch.org/models/{name}"


def test_torch_hub_dir_not_touched_outside_tmp(dirs):
    # The fixture's TORCH_HOME must be what torch.hub sees, so no test can read or write the real cache.
    assert str(dirs["hub"]).startswith(str(torch.hub.get_dir()))
