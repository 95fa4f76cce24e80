"""The high-frequency energy ratio that validation reports as `val/hf_ratio`."""

import numpy as np
import pytest
import torch

from gan_core.data import bicubic_upscale, validation_pair
from gan_core.scoring import LAPLACIAN_3X3, evaluate_images, hf_ratio, high_frequency_energy, mean_metrics, to_uint8


def gray(values: np.ndarray) -> np.ndarray:
    """An HxWx3 image whose Y channel is an affine function of `values` (all three channels equal)."""
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def test_energy_is_the_mean_squared_laplacian_of_y():
    img = gray(np.array([[0, 0, 0, 0], [0, 100, 0, 0], [0, 0, 0, 0], [0, 0, 0, 50]]))
    y = 16 + 219 * img[..., 0].astype(np.float64) / 255  # BT.601 Y of a gray image
    # the valid interior is 2x2; the Laplacian at (1, 1) is -4 * (y100 - y0), etc.
    lap = np.array([[sum(LAPLACIAN_3X3[a, b] * y[i + a - 1, j + b - 1] for a in range(3) for b in range(3))
                     for j in (1, 2)] for i in (1, 2)])
    assert high_frequency_energy(img) == pytest.approx(np.mean(lap**2), rel=1e-5)
    assert high_frequency_energy(gray(np.full((5, 5), 77))) == 0.0
    # a linear ramp has no Laplacian either: only curvature (detail) counts
    assert high_frequency_energy(gray(np.tile(np.arange(0, 200, 20), (10, 1)))) == pytest.approx(0.0, abs=1e-6)


def test_ratio_is_one_for_the_reference_and_scales_with_contrast():
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 100, (16, 16))
    assert hf_ratio(gray(texture), gray(texture)) == pytest.approx(1.0)
    # twice the contrast: four times the energy (Y is affine in the gray value, the Laplacian kills the offset)
    assert hf_ratio(gray(2 * texture), gray(texture)) == pytest.approx(4.0, rel=1e-3)
    assert hf_ratio(gray(np.full((8, 8), 9)), gray(np.full((8, 8), 200))) == 1.0
    assert hf_ratio(gray(texture), gray(np.full((16, 16), 9))) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        hf_ratio(gray(texture), gray(texture[:8]))
    # crop_border drops the edge before the Laplacian
    framed = np.full((16, 16), 50)
    framed[0, :] = 255
    assert hf_ratio(gray(framed), gray(np.full((16, 16), 50)), crop_border=1) == 1.0


def test_bicubic_is_far_below_one_and_validation_reports_it():
    hr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    lq, gt = validation_pair(hr, 4)
    bicubic = to_uint8(bicubic_upscale(lq, 4))
    assert hf_ratio(bicubic, to_uint8(gt), crop_border=4) < 0.2

    class Bicubic(torch.nn.Module):
        def forward(self, x):
            return bicubic_upscale(x, 4)

    means = mean_metrics(evaluate_images(Bicubic(), [hr], 4, torch.device("cpu")))
    assert means["hf_ratio"] == pytest.approx(means["bicubic_hf_ratio"]) and means["hf_ratio"] < 0.2
