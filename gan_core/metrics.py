"""PSNR and SSIM with BasicSR 1.4.2's exact definitions, on RGB images.

`psnr` and `ssim` reproduce `basicsr.metrics.calculate_psnr` / `calculate_ssim`
on uint8 images, the ones papers report (validation rounds outputs to uint8
first, as BasicSR's `tensor2img` does).

Differences from BasicSR, on purpose: our images are RGB, so the Y channel uses
the RGB order of the BT.601 coefficients (BasicSR reads BGR with cv2); cv2 is
not needed (its 11x11 `filter2D` followed by the [5:-5, 5:-5] crop is a
'valid' correlation, done here with scipy).

Precision follows BasicSR step by step: the Y conversion runs on float32
(`img.astype(float32) / 255`, BT.601 dot product, back to float32), everything
after it in float64. Identical images give a PSNR of inf, as BasicSR.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# ITU-R BT.601 luma for RGB input in [0, 1], giving Y in [16, 235].
Y_COEFFS_RGB = (65.481, 128.553, 24.966)
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5


def gaussian_kernel(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian kernel, float64, summing to 1 (cv2.getGaussianKernel(size, sigma)).

    Args:
        size: Odd kernel length.
        sigma: Standard deviation in pixels.

    Returns:
        (size,) float64 array.
    """
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y channel of BT.601 YCbCr, as BasicSR's `to_y_channel` but for RGB input.

    Args:
        img: (H, W, 3) RGB image with values in [0, 255] (uint8 or float).

    Returns:
        (H, W) float32 Y channel in [16, 235] (not rounded).

    Raises:
        ValueError: `img` is not (H, W, 3).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects an (H, W, 3) image, got shape {img.shape}")
    img = img.astype(np.float32) / 255.0
    # Dot product with a float64 vector promotes to float64, then BasicSR's
    # `_convert_output_type_range` divides by 255 and casts back to float32.
    y = (np.dot(img, np.array(Y_COEFFS_RGB)) + 16.0) / 255.0
    return y.astype(np.float32) * np.float32(255.0)


def _prepare(img: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, crop, optionally take Y; return float64 (H, W, C) arrays."""
    if img.shape != img2.shape:
        raise ValueError(f"Image shapes differ: {img.shape} vs {img2.shape}")
    if img.ndim == 2:
        img, img2 = img[..., None], img2[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"Expected (H, W, 3) RGB or (H, W) gray images, got shape {img.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, :]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, :]
    if y_channel:
        img, img2 = _to_y_channel(img), _to_y_channel(img2)
    return img.astype(np.float64), img2.astype(np.float64)


def _to_y_channel(img: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel: RGB -> (H, W, 1) Y; gray goes through the same float32 round trip."""
    if img.shape[2] == 3:
        return rgb_to_y(img)[..., None]
    return (img.astype(np.float32) / 255.0) * np.float32(255.0)


def psnr(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB, as BasicSR 1.4.2's calculate_psnr (RGB input).

    Args:
        img: (H, W, 3) RGB or (H, W) gray image, values in [0, 255] (uint8).
        img2: Same shape.
        crop_border: Pixels dropped at each edge before comparing (usually the scale).
        y_channel: Compare the BT.601 Y channel only.

    Returns:
        PSNR in dB; inf for identical images.

    Raises:
        ValueError: Shapes differ or are not (H, W[, 3]).
    """
    img, img2 = _prepare(img, img2, crop_border, y_channel)
    mse = np.mean((img - img2) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _ssim_channel(img: np.ndarray, img2: np.ndarray) -> float:
    """SSIM of one float64 (H, W) channel pair in [0, 255], mean over the valid region."""
    kernel = gaussian_kernel()
    margin = SSIM_WINDOW_SIZE // 2

    def filt(x: np.ndarray) -> np.ndarray:
        # The window is separable: two 1-D passes cost 22 instead of 121
        # multiply-adds per pixel. Filtering then cropping `margin` pixels is
        # cv2.filter2D + BasicSR's [5:-5, 5:-5]: the kept region never sees
        # the border mode.
        x = ndimage.correlate1d(x, kernel, axis=0, mode="mirror")
        x = ndimage.correlate1d(x, kernel, axis=1, mode="mirror")
        return x[margin:-margin, margin:-margin]

    mu1, mu2 = filt(img), filt(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = filt(img**2) - mu1_sq
    sigma2_sq = filt(img2**2) - mu2_sq
    sigma12 = filt(img * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / (
        (mu1_sq + mu2_sq + SSIM_C1) * (sigma1_sq + sigma2_sq + SSIM_C2)
    )
    return float(ssim_map.mean())


def ssim(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM, as BasicSR 1.4.2's calculate_ssim (RGB input): 11x11 Gaussian window,
    sigma 1.5, valid region only, mean over channels.

    Args:
        img: (H, W, 3) RGB or (H, W) gray image, values in [0, 255] (uint8).
        img2: Same shape.
        crop_border: Pixels dropped at each edge before comparing.
        y_channel: Compare the BT.601 Y channel only.

    Returns:
        SSIM in (-1, 1].

    Raises:
        ValueError: Shapes differ or are not (H, W[, 3]), or the (cropped)
            image is smaller than the 11x11 window plus one pixel.
    """
    img, img2 = _prepare(img, img2, crop_border, y_channel)
    if min(img.shape[:2]) <= SSIM_WINDOW_SIZE - 1:
        raise ValueError(
            f"SSIM needs images larger than {SSIM_WINDOW_SIZE - 1} px per side after cropping, got {img.shape[:2]}"
        )
    return float(np.mean([_ssim_channel(img[..., c], img2[..., c]) for c in range(img.shape[2])]))


# --- batched tensor versions (BasicSR's *_pt) --------------------------------
