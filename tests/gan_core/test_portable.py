"""Generator files for the SR ecosystem: spandrel (chaiNNer, ComfyUI) loads what computes the same, and
nothing that would compute something else; our loader never guesses an architecture."""

import json

import pytest
import spandrel
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gan_core.checkpoint import load_generator
from gan_core.models import RRDBNet, generator_config
from gan_core.portable import OURS_ONLY_PREFIX, ecosystem_problems, parse_arch, write_portable

BASICSR_EXACT = dict(num_feat=16, num_block=2, num_grow_ch=32, scale=4)
OTHERS = {
    "res_scale": dict(num_feat=16, num_block=2, num_grow_ch=32, scale=4, res_scale=0.3),
    "bicubic_skip": dict(num_feat=16, num_block=2, num_grow_ch=32, scale=4, upsample_skip="bicubic"),
    "grow_16": dict(num_feat=16, num_block=2, num_grow_ch=16, scale=4),
}


def _trained_like(**kwargs) -> RRDBNet:
    """An RRDBNet whose weights are all non-trivial (a bicubic-skip net starts with conv_last at zero)."""
    torch.manual_seed(0)
    model = RRDBNet(**kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def _spandrel_output(file, x):
    descriptor = spandrel.ModelLoader().load_from_file(str(file))
    model = descriptor.model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("scale", [4, 2])
def test_basicsr_exact_generator_loads_in_spandrel_and_computes_the_same(tmp_path, scale):
    model = _trained_like(**{**BASICSR_EXACT, "scale": scale})
    files = write_portable(tmp_path, generator_config(model), model.state_dict(), step=7)
    assert files.loadable_elsewhere and files.pth is not None
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    want = _outputs(model, x)
    for file in (files.safetensors, files.pth):
        assert (_spandrel_output(file, x) - want).abs().max().item() < 1e-4, file
        assert torch.equal(_outputs(load_generator(file, arch="basicsr" if file.suffix == ".pth" else None), x),
                           want)
    with safe_open(str(files.safetensors), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["gan_core_generator"]) == generator_config(model)
    assert metadata["step"] == "7" and metadata["loadable_by"].startswith("any ESRGAN loader")
    assert set(torch.load(files.pth, weights_only=True)) == {"params_ema"}


@pytest.mark.parametrize("kind", sorted(OTHERS))
def test_other_architectures_load_in_gan_core_only(tmp_path, kind):
    model = _trained_like(**OTHERS[kind])
    files = write_portable(tmp_path, generator_config(model), model.state_dict(), step=3)
    assert files.pth is None and len(files.problems) == 1 and kind.split("_")[0] in files.problems[0]
    # No other loader recognises it: spandrel refuses instead of computing something else.
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_file(str(files.safetensors))
    with safe_open(str(files.safetensors), "pt") as handle:
        assert all(key.startswith(OURS_ONLY_PREFIX) for key in handle.keys())
        assert handle.metadata()["loadable_by"].startswith("gan_core only")
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_outputs(load_generator(files.safetensors), x), _outputs(model, x))


def test_plain_weights_need_the_architecture_from_the_caller(tmp_path):
    model = _trained_like(**OTHERS["res_scale"])
    pth, plain_safetensors = tmp_path / "plain.pth", tmp_path / "plain.safetensors"
    torch.save(model.state_dict(), pth)
    save_file(model.state_dict(), str(plain_safetensors))
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    for file in (pth, plain_safetensors):
        with pytest.raises(ValueError, match="res_scale or upsample_skip.*basicsr"):
            load_generator(file)
        loaded = load_generator(file, arch="res_scale=0.3")
        assert loaded.res_scale == 0.3 and torch.equal(_outputs(loaded, x), _outputs(model, x))
    with pytest.raises(ValueError, match="num_feat=32.*shapes say 16"):
        load_generator(pth, arch={"num_feat": 32, "res_scale": 0.3})
    with pytest.raises(ValueError, match="unexpected keyword|res_scal"):
        load_generator(pth, arch="res_scal=0.3")


def test_a_file_with_its_config_refuses_a_contradicting_arch(tmp_path):
    model = _trained_like(**OTHERS["res_scale"])
    files = write_portable(tmp_path, generator_config(model), model.state_dict(), step=0)
    with pytest.raises(ValueError, match="records res_scale=0.3, but arch asks for res_scale=0.2"):
        load_generator(files.safetensors, arch="basicsr")


def test_parse_arch_and_problems():
    assert parse_arch("basicsr") == {"res_scale": 0.2, "upsample_skip": "none"}
    assert parse_arch("res_scale=0.116, upsample_skip=bicubic") == {"res_scale": 0.116, "upsample_skip": "bicubic"}
    with pytest.raises(ValueError, match="'0.3' is not KEY=VALUE"):
        parse_arch("0.3")
    assert ecosystem_problems({"name": "rrdb", "num_grow_ch": 32, "res_scale": 0.2, "upsample_skip": "none"}) == []


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_generator(bad)


def test_a_full_resolution_x1_trunk_loads_in_gan_core_only():
    base = {"name": "rrdb", "num_grow_ch": 32, "res_scale": 0.2, "upsample_skip": "none"}
    assert ecosystem_problems({**base, "scale": 1, "pixel_unshuffle": False}) == [
        "pixel_unshuffle is off (ESRGAN loaders pixel-unshuffle x1 / x2 inputs)"]
    assert ecosystem_problems({**base, "scale": 4, "pixel_unshuffle": False}) == []  # x4 never unshuffles
