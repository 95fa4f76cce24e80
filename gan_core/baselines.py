"""Classical, training-free baselines that the denoise / lowlight / fusion tasks are compared with.

Each function takes uint8 images and returns uint8 images of the same shape:
(H, W, 3) RGB for `nlm_denoise`, `gamma_correct` and `clahe`, (H, W) gray for
`average_fusion`. Luminance means BT.601 luma, Y' = 0.299 R + 0.587 G + 0.114 B,
on the gamma-encoded values.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import convolve2d
from scipy.stats import norm
from skimage import color, exposure, restoration

LUMA_COEFFS_RGB = (0.299, 0.587, 0.114)  # BT.601, as skimage's rgb2ycbcr
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 6
NLM_H_OVER_SIGMA = 0.8  # skimage's starting point for fast_mode=True when sigma is passed
# Daubechies-2 decomposition high-pass filter, closed form (PyWavelets' `db2` dec_hi to 1 ulp).
_SQRT3 = np.sqrt(3.0)
DB2_HIGH_PASS = np.array([-(1 + _SQRT3), 3 + _SQRT3, -(3 - _SQRT3), 1 - _SQRT3]) / (4 * np.sqrt(2.0))
GAMMA_TARGET_MEAN = 0.5
GAMMA_RANGE = (0.1, 1.0)


def _check_rgb(img: np.ndarray, name: str = "img") -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) RGB image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got dtype {img.dtype}")
    return img


def _to_uint8(img01: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8, clipped and rounded."""
    return np.round(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Gaussian noise level of an RGB image, on the 0-255 scale.

    The estimator of `skimage.restoration.estimate_sigma(img, channel_axis=-1,
    average_sigmas=True)`, re-implemented because skimage's needs PyWavelets,
    which is not a dependency of this project (it raises ImportError without
    it). Per channel, the robust median estimator of Donoho & Johnstone (Biometrika
    81(3), 1994), sigma = median(|d|) / Phi^-1(0.75), over the nonzero
    finest diagonal (HH) coefficients d of a one-level 2-D db2 wavelet
    transform with symmetric extension (PyWavelets' `dwtn` defaults); then the
    mean over the channels.

    Args:
        img: (H, W, 3) uint8 RGB image.

    Returns:
        Estimated sigma in grey levels (0-255). A flat image gives about
        1e-14, not 0: the db2 high-pass sums to 0 only up to rounding, and
        skimage's estimate has the same residue.

    Raises:
        ValueError: `img` is not (H, W, 3) uint8.
    """
    img = _check_rgb(img)
    sigmas = []
    for channel in np.moveaxis(img.astype(np.float64), -1, 0):
        rows, cols = channel.shape
        # pywt's 'symmetric' mode is numpy's: the edge sample repeated (half-sample symmetry).
        padded = np.pad(channel, DB2_HIGH_PASS.size - 1, mode="symmetric")
        full = convolve2d(padded, np.outer(DB2_HIGH_PASS, DB2_HIGH_PASS), mode="full")
        # pywt keeps every other sample of the full convolution from index 4,
        # (n + 3) // 2 of them per axis.
        diagonal = full[4 : 4 + 2 * ((rows + 3) // 2) : 2, 4 : 4 + 2 * ((cols + 3) // 2) : 2]
        diagonal = diagonal[diagonal != 0]
        sigmas.append(np.median(np.abs(diagonal)) / norm.ppf(0.75) if diagonal.size else 0.0)
    return float(np.mean(sigmas))


def nlm_denoise(img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Non-local means (scikit-image's fast variant) with h tied to the noise level.

    Runs `skimage.restoration.denoise_nl_means(img / 255, patch_size=5,
    patch_distance=6, h=0.8 * s, sigma=s, fast_mode=True, channel_axis=-1)`
    with s = sigma / 255. Passing `sigma` makes skimage subtract the expected
    noise variance from the patch distances; its docs (`denoise_nl_means`
    Notes, and the gallery example "Non-local means denoising for preserving
    textures") give h = 0.8 * sigma as the starting point for fast_mode=True
    in that case, and patch_size 5 / patch_distance 6 are that example's
    settings.

    Args:
        img: (H, W, 3) uint8 RGB image.
        sigma: Standard deviation of the Gaussian noise on the 0-255 scale.
            None estimates it with `estimate_noise_sigma` (skimage's
            `estimate_sigma` averaged over the channels, as in the gallery
            example).

    Returns:
        (H, W, 3) uint8 denoised image; a copy of `img` when `sigma` is 0.

    Raises:
        ValueError: `img` is not (H, W, 3) uint8, or `sigma` is negative.
    """
    img = _check_rgb(img)
    if sigma is None:
        sigma = estimate_noise_sigma(img)
    elif sigma < 0:
        raise ValueError(f"sigma must be >= 0 (0-255 scale), got {sigma}")
    sigma01 = sigma / 255.0
    if sigma01 == 0:
        return img.copy()
    denoised = restoration.denoise_nl_means(
        img.astype(np.float64) / 255.0,
        patch_size=NLM_PATCH_SIZE,
        patch_distance=NLM_PATCH_DISTANCE,
        h=NLM_H_OVER_SIGMA * sigma01,
        sigma=sigma01,
        fast_mode=True,
        channel_axis=-1,
    )
    return _to_uint8(denoised)


def mean_luminance(img: np.ndarray) -> float:
    """Mean BT.601 luma of an (H, W, 3) uint8 RGB image, in [0, 1].

    Raises:
        ValueError: `img` is not (H, W, 3) uint8.
    """
    img = _check_rgb(img)
    return float(np.mean(img.astype(np.float64) @ np.array(LUMA_COEFFS_RGB)) / 255.0)


def gamma_correct(img: np.ndarray, gamma: float | None = None) -> np.ndarray:
    """Power-law brightening, out = 255 * (img / 255) ** gamma, per RGB channel.

    With `gamma=None` the exponent maps the image's mean luminance m to 0.5:
    gamma = log(0.5) / log(m), clamped to [0.1, 1]. The clamp means an image
    already at or above 0.5 is left as it is (gamma = 1: this baseline only
    brightens) and a nearly black one gets at most gamma = 0.1. The mean of
    the result is close to 0.5 for images of narrow histogram; for a wide one
    it lands lower, since the mean of x**gamma is below (mean x)**gamma.

    Args:
        img: (H, W, 3) uint8 RGB image.
        gamma: Exponent > 0; below 1 brightens. None picks it as above.

    Returns:
        (H, W, 3) uint8 image.

    Raises:
        ValueError: `img` is not (H, W, 3) uint8, or `gamma` is not > 0.
    """
    img = _check_rgb(img)
    if gamma is None:
        m = mean_luminance(img)
        low, high = GAMMA_RANGE
        # m = 0 would give log(0) and m = 1 a division by 0: both are clamped anyway
        gamma = high if m >= GAMMA_TARGET_MEAN else (low if m == 0 else np.log(GAMMA_TARGET_MEAN) / np.log(m))
        gamma = float(np.clip(gamma, low, high))
    elif gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return _to_uint8((img.astype(np.float64) / 255.0) ** gamma)


def clahe(img: np.ndarray, clip_limit: float = 0.01) -> np.ndarray:
    """CLAHE on the luminance only, colours kept.

    The image goes to YCbCr (BT.601, skimage's `rgb2ycbcr`, Y in [16, 235]);
    Y is equalised by `skimage.exposure.equalize_adapthist` (its defaults:
    tiles of 1/8 of each side, 256 bins), Cb and Cr are kept, and the result goes
    back to RGB. Note that `equalize_adapthist` also stretches its input and
    its output to the full range, so the new Y spans [16, 235].

    Args:
        img: (H, W, 3) uint8 RGB image.
        clip_limit: `equalize_adapthist`'s clip limit in (0, 1]; higher gives
            more contrast.

    Returns:
        (H, W, 3) uint8 image.

    Raises:
        ValueError: `img` is not (H, W, 3) uint8.
    """
    img = _check_rgb(img)
    ycbcr = color.rgb2ycbcr(img)  # float64, Y in [16, 235]
    luma01 = np.clip((ycbcr[..., 0] - 16.0) / 219.0, 0.0, 1.0)
    if luma01.max() > luma01.min():  # a flat image has no contrast to equalise
        ycbcr[..., 0] = 16.0 + 219.0 * exposure.equalize_adapthist(luma01, clip_limit=clip_limit)
    return _to_uint8(color.ycbcr2rgb(ycbcr))


def average_fusion(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """Pixel-wise mean of two gray images, rounded half up: (ir + vi + 1) // 2.

    Args:
        ir: (H, W) or (H, W, 1) uint8 infrared image.
        vi: Visible image as gray, same shape.

    Returns:
        (H, W) uint8 fused image.

    Raises:
        ValueError: An image is not a uint8 gray image, or the shapes differ.
    """
    grays = []
    for name, image in (("ir", ir), ("vi", vi)):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(f"{name} must be a uint8 (H, W) or (H, W, 1) gray image, got {image.dtype} {image.shape}")
        grays.append(image)
    ir, vi = grays
    if ir.shape != vi.shape:
        raise ValueError(f"ir and vi must have the same (H, W), got {ir.shape} and {vi.shape}")
    # uint16 so that 255 + 255 does not wrap
    return ((ir.astype(np.uint16) + vi + 1) // 2).astype(np.uint8)
