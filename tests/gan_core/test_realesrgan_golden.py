"""Golden tests: our Real-ESRGAN pieces equal BasicSR 1.4.2's for the same parameters.

BasicSR's own code runs standalone, straight from its sdist (`make install` downloads it into
.venv/reference/; $BASICSR_SDIST overrides the path): degradations.py (kernels, Poisson noise),
img_process_util.py (filter2D, USMSharp) and diffjpeg.py. They need cv2 (opencv-python-headless, in the
`test` extra) and torchvision.transforms.functional_tensor, gone from current torchvision: a shim gives
them rgb_to_grayscale. Random draws are compared by handing BasicSR's random_mixed_kernels our draws
through stand-ins for `random.choices` and `np.random.uniform`.
"""

from __future__ import annotations

import math
import os
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_core.config import BlindDegradationSection
from gan_core.data.blur_kernels import (
    KERNEL_TYPES,
    bivariate_gaussian,
    bivariate_generalized_gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
    draw_blur_kernels,
)
from gan_core.data.jpeg import jpeg_round_trip
from gan_core.data.realesrgan import _poisson_noise, filter2d, usm_sharpen

ROOT = Path(__file__).resolve().parents[2]
SDIST = Path(os.environ.get("BASICSR_SDIST", ROOT / ".venv" / "reference" / "basicsr-1.4.2.tar.gz"))
# BasicSR's sinc kernel divides 0 by 0 at the centre (then overwrites it) with numpy's warnings on.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
GET_IT = ("pip download basicsr==1.4.2 --no-deps --no-build-isolation --no-binary :all: -d .venv/reference "
          "(or `make install`), or point $BASICSR_SDIST at the tarball")


def _source(member: str) -> str:
    if not SDIST.is_file():
        pytest.fail(f"BasicSR 1.4.2's sdist is missing at {SDIST}: {GET_IT}")
    with tarfile.open(SDIST) as archive:
        return archive.extractfile(f"basicsr-1.4.2/{member}").read().decode()


def _load(member: str) -> dict:
    """Execute one BasicSR source file as a standalone module; its namespace."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        pytest.fail("BasicSR's sources import cv2: pip install opencv-python-headless (in the `test` extra)")
    shim_name = "torchvision.transforms.functional_tensor"
    added = shim_name not in sys.modules
    if added:
        from torchvision.transforms.functional import rgb_to_grayscale

        shim = types.ModuleType(shim_name)
        shim.rgb_to_grayscale = rgb_to_grayscale
        sys.modules[shim_name] = shim
    old_err = np.geterr()  # degradations.py silences numpy warnings process-wide: not beyond this test
    try:
        namespace = {"__name__": f"basicsr_{Path(member).stem}"}
        exec(compile(_source(member), member, "exec"), namespace)
    finally:
        np.seterr(**old_err)
        if added:
            del sys.modules[shim_name]
    return namespace


@pytest.fixture(scope="module")
def degradations():
    return _load("basicsr/data/degradations.py")


@pytest.fixture(scope="module")
def img_process():
    return _load("basicsr/utils/img_process_util.py")


def test_the_sdist_is_where_the_makefile_puts_it():
    assert SDIST.is_file(), f"BasicSR 1.4.2's sdist is missing at {SDIST}: {GET_IT}"


@pytest.mark.parametrize("size", [7, 13, 21])
@pytest.mark.parametrize("sigma_x, sigma_y, theta", [(0.2, 0.2, 0.0), (1.3, 0.7, 0.4), (3.0, 1.1, -2.9)])
def test_gaussian_kernels(degradations, size, sigma_x, sigma_y, theta):
    for isotropic in (True, False):
        want = degradations["bivariate_Gaussian"](size, sigma_x, sigma_y, theta, isotropic=isotropic)
        got = bivariate_gaussian(size, sigma_x, sigma_y, theta, isotropic=isotropic).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [7, 15, 21])
@pytest.mark.parametrize("sigma_x, sigma_y, theta, beta", [(0.5, 2.0, 1.0, 0.5), (2.2, 0.9, -0.3, 1.0),
                                                           (1.0, 3.0, 3.1, 4.0), (2.0, 1.5, 0.7, 1.7)])
def test_generalized_gaussian_and_plateau_kernels(degradations, size, sigma_x, sigma_y, theta, beta):
    for isotropic in (True, False):
        want = degradations["bivariate_generalized_Gaussian"](size, sigma_x, sigma_y, theta, beta, isotropic=isotropic)
        got = bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta, isotropic=isotropic).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        want = degradations["bivariate_plateau"](size, sigma_x, sigma_y, theta, beta, isotropic=isotropic)
        got = bivariate_plateau(size, sigma_x, sigma_y, theta, beta, isotropic=isotropic).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, pad_to", [(7, 0), (11, 21), (13, 0), (21, 21)])
@pytest.mark.parametrize("cutoff", [math.pi / 5, math.pi / 3, 2.0, math.pi])
def test_sinc_kernels(degradations, size, pad_to, cutoff):
    want = degradations["circular_lowpass_kernel"](cutoff, size, pad_to=pad_to)
    got = circular_lowpass_kernel(cutoff, size, pad_to=pad_to).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


class _DrawsFromUs:
    """Stand-in for `np.random` in BasicSR's namespace: uniform() returns our draws in call order and checks
    that each lies in the range BasicSR asks for."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, low=0.0, high=1.0, size=None):
        assert size is None
        value = self.values.pop(0)
        assert low - 1e-12 <= value <= high + 1e-12, (low, value, high)
        return value


def test_random_mixed_kernels_with_real_esrgan_settings(degradations):
    # The first and second orders' settings; 200 kernels cover every type, sinc, and both beta branches.
    for order in (BlindDegradationSection().first, BlindDegradationSection().second):
        settings = order.kernel_kwargs()
        kernels, params = draw_blur_kernels(200, torch.Generator().manual_seed(1), **settings)
        assert set(params["type"].tolist()) == set(range(len(KERNEL_TYPES))) and params["is_sinc"].any()
        namespace = dict(degradations)
        stand_in_np = types.SimpleNamespace(**{name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
        namespace["np"] = stand_in_np
        mixed = types.FunctionType(degradations["random_mixed_kernels"].__code__, namespace)
        for name in ("random_bivariate_Gaussian", "random_bivariate_generalized_Gaussian", "random_bivariate_plateau"):
            namespace[name] = types.FunctionType(degradations[name].__code__, namespace,
                                                 argdefs=degradations[name].__defaults__)
        for i in range(200):
            size = int(params["size"][i])
            if params["is_sinc"][i]:  # Real-ESRGAN's dataset: sinc kernel, cutoff range by size, padded to 21
                low = math.pi / 3 if size < 13 else math.pi / 5
                assert low <= params["cutoff"][i] <= math.pi
                want = degradations["circular_lowpass_kernel"](float(params["cutoff"][i]), size)
            else:
                name = KERNEL_TYPES[int(params["type"][i])]
                sx, sy, theta, beta = (float(params[k][i]) for k in ("sigma_x", "sigma_y", "theta", "beta"))
                draws = [sx] if name == "iso" else [sx, sy, theta] if name == "aniso" else []
                if name.startswith(("generalized", "plateau")):
                    draws = ([sx] if name.endswith("_iso") else [sx, sy, theta]) + [0.25 if beta <= 1 else 0.75, beta]
                stand_in_np.random = _DrawsFromUs(draws)
                namespace["random"] = types.SimpleNamespace(choices=lambda names, probs, _n=name: [_n])
                want = mixed(list(KERNEL_TYPES), [order.kernel_probs[k] for k in KERNEL_TYPES], size,
                             order.blur_sigma, order.blur_sigma, [-math.pi, math.pi], order.betag_range,
                             order.betap_range, noise_range=None)
                assert stand_in_np.random.values == []
            pad = (21 - size) // 2
            np.testing.assert_allclose(kernels[i].numpy(), np.pad(want, ((pad, pad), (pad, pad))), rtol=0, atol=1e-12)


def test_filter2d(img_process):
    generator = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 40, 36, generator=generator)
    kernels = draw_blur_kernels(3, generator, **BlindDegradationSection().first.kernel_kwargs())[0].float()
    torch.testing.assert_close(filter2d(img, kernels), img_process["filter2D"](img, kernels), rtol=0, atol=1e-6)
    one = kernels[:1]
    torch.testing.assert_close(filter2d(img, one), img_process["filter2D"](img, one), rtol=0, atol=1e-6)


def test_usm_sharpen(img_process):
    img = torch.rand(2, 3, 64, 56, generator=torch.Generator().manual_seed(2))
    want = img_process["USMSharp"]()(img)
    torch.testing.assert_close(usm_sharpen(img), want, rtol=0, atol=2e-6)


def test_jpeg_equals_diffjpeg():
    diffjpeg = _load("basicsr/utils/diffjpeg.py")["DiffJPEG"](differentiable=False)
    generator = torch.Generator().manual_seed(3)
    for height, width in [(32, 32), (37, 50)]:
        coarse = torch.rand(4, 3, height // 4, width // 4, generator=generator)
        img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
        quality = torch.tensor([30.0, 47.3, 50.0, 95.0])
        torch.testing.assert_close(jpeg_round_trip(img, quality), diffjpeg(img, quality=quality.clone()),
                                   rtol=0, atol=1e-6)


def test_poisson_noise(degradations):
    img = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(4)) * torch.tensor([1.0, 0.2, 0.05]).view(3, 1, 1, 1)
    from torchvision.transforms.functional import rgb_to_grayscale

    for gray in (0, 1):
        torch.manual_seed(5)
        want = degradations["generate_poisson_noise_pt"](img, scale=1.0, gray_noise=torch.full((3,), float(gray)))
        torch.manual_seed(5)  # BasicSR draws the gray noise first, then the colour noise
        source = rgb_to_grayscale(img, num_output_channels=1) if gray else img
        got = _poisson_noise(source, None).expand_as(img)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_missing_sdist_fails_and_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "SDIST", tmp_path / "basicsr-1.4.2.tar.gz")
    with pytest.raises(pytest.fail.Exception, match="pip download basicsr==1.4.2"):
        _source("basicsr/data/degradations.py")
