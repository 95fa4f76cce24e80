"""PSNR / SSIM against golden values computed with BasicSR 1.4.2 itself.

The golden numbers were produced by running basicsr 1.4.2's
`metrics/psnr_ssim.py` + `utils/color_util.py` (with opencv-python-headless
5.0) on the same images and degradations as below, feeding BasicSR the
channel-reversed (BGR) arrays it expects. Our implementation matched them to
0 (PSNR) and < 2e-14 (SSIM). Neither basicsr nor cv2 is needed here.
"""

import numpy as np
import pytest
from skimage import data

from gan_core.metrics import psnr, rgb_to_y, ssim


def degrade_noise(img):
    # deterministic pseudo-noise in [-12, 12]: no RNG, so the golden values
    # cannot drift with numpy's random streams
    idx = np.arange(img.size, dtype=np.int64).reshape(img.shape)
    noise = (idx * 7919 + (idx // 13) * 104729) % 25 - 12
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def degrade_blocky(img):
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[::2, ::2].repeat(2, 0).repeat(2, 1)[:h, :w])


def degrade_quant(img):
    return ((img // 16) * 16 + 8).astype(np.uint8)


CASES = {
    "astronaut": (data.astronaut, degrade_noise),
    "chelsea": (data.chelsea, degrade_blocky),
    "coffee": (data.coffee, degrade_quant),
    "camera": (data.camera, degrade_noise),  # (H, W) gray
}

# (image, crop_border, y_channel, BasicSR calculate_psnr, BasicSR calculate_ssim)
GOLDEN = [
    ("astronaut", 0, False, 31.360390295730692, 0.7315402769611921),
    ("astronaut", 0, True, 36.574800909689486, 0.9076387732713476),
    ("astronaut", 4, False, 31.356964680413853, 0.7342563489229414),
    ("astronaut", 4, True, 36.574069719111556, 0.908382116804614),
    ("chelsea", 0, False, 29.485510529637395, 0.8249577302000853),
    ("chelsea", 0, True, 30.90172674496836, 0.842085293848637),
    ("chelsea", 4, False, 29.368938418709373, 0.8213260570286663),
    ("chelsea", 4, True, 30.784972593922557, 0.8386258418412887),
    ("coffee", 0, False, 34.789727143058386, 0.8896630260165984),
    ("coffee", 0, True, 39.720431896039955, 0.9645483318984106),
    ("coffee", 4, False, 34.79019796394156, 0.8896662925789757),
    ("coffee", 4, True, 39.7258009404048, 0.9645290002290334),
    ("camera", 0, False, 31.03498126792482, 0.7150816690040805),
    ("camera", 4, True, 31.036807615472192, 0.7163807505993328),
]


def pair(name):
    load, degrade = CASES[name]
    img = load()
    return img, degrade(img)


@pytest.mark.parametrize("name,crop,y,want_psnr,want_ssim", GOLDEN)
def test_numpy_metrics_match_basicsr(name, crop, y, want_psnr, want_ssim):
    img, img2 = pair(name)
    assert psnr(img, img2, crop_border=crop, y_channel=y) == pytest.approx(want_psnr, abs=1e-6)
    assert ssim(img, img2, crop_border=crop, y_channel=y) == pytest.approx(want_ssim, abs=1e-6)


def test_identical_images():
    img = data.astronaut()[:64, :64]
    assert psnr(img, img) == float("inf")
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_rgb_to_y_is_bt601_rgb_order():
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, 0] = (255, 0, 0)  # pure red: Y = 16 + 65.481
    img[0, 1] = (0, 0, 255)  # pure blue: Y = 16 + 24.966 (BGR order would give 65.481)
    img[1, 1] = (255, 255, 255)
    y = rgb_to_y(img)
    assert y.dtype == np.float32 and y.shape == (2, 2)
    np.testing.assert_allclose(y, [[16 + 65.481, 16 + 24.966], [16.0, 235.0]], atol=1e-4)


def test_errors():
    img = data.astronaut()[:32, :32]
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(img, img[:31])
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(img, img[:, :31])
    with pytest.raises(ValueError, match="larger than"):
        ssim(img[:10, :10], img[:10, :10])
    with pytest.raises(ValueError, match="Expected"):
        psnr(img[..., :2], img[..., :2])
