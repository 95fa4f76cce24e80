"""Classical baselines: each does its job on small synthetic images (< 1 s in all)."""

import numpy as np
import pytest
from skimage.color import rgb2ycbcr

from gan_core.baselines import (
    average_fusion,
    clahe,
    estimate_noise_sigma,
    gamma_correct,
    mean_luminance,
    nlm_denoise,
)
from gan_core.metrics import psnr


def smooth_rgb(size=64):
    """Gradients and a slow sine: no texture for NLM to lose."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * np.sin(3 * xx + 2 * yy)], axis=-1)
    return np.round(img * 255).astype(np.uint8)


def add_noise(img, sigma, seed=0):
    noise = np.random.default_rng(seed).normal(0.0, sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


def luma(img):
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# --- NLM ---------------------------------------------------------------------


def test_nlm_denoise_raises_psnr_of_a_noisy_smooth_image():
    clean = smooth_rgb()
    noisy = add_noise(clean, 25)
    denoised = nlm_denoise(noisy, sigma=25)
    assert denoised.shape == clean.shape and denoised.dtype == np.uint8
    # about 20.2 dB -> 38.6 dB here
    assert psnr(denoised, clean) > psnr(noisy, clean) + 3


def test_nlm_denoise_estimates_sigma_when_not_given():
    clean = smooth_rgb()
    noisy = add_noise(clean, 25, seed=1)
    # The wavelet MAD estimate of a smooth image's noise is close to the truth
    # (clipping at 0 / 255 trims the noise a little).
    assert estimate_noise_sigma(noisy) == pytest.approx(25, rel=0.1)
    assert psnr(nlm_denoise(noisy), clean) > psnr(noisy, clean) + 3


def test_nlm_denoise_without_noise_is_the_identity():
    flat = np.full((16, 16, 3), 90, np.uint8)
    # the db2 high-pass sums to 0 only up to rounding, so a flat image's estimate is ~1e-14, not 0
    assert estimate_noise_sigma(flat) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(nlm_denoise(flat), flat)
    np.testing.assert_array_equal(nlm_denoise(smooth_rgb(16), sigma=0), smooth_rgb(16))


def test_nlm_denoise_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB image, got shape \(8, 8\)"):
        nlm_denoise(np.zeros((8, 8), np.uint8), sigma=10)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        nlm_denoise(np.zeros((8, 8, 3), np.uint8), sigma=-1)


# --- gamma -------------------------------------------------------------------


def test_gamma_correct_brings_a_dark_image_mean_to_one_half():
    dark = np.clip(np.round(np.random.default_rng(0).normal(30, 8, (32, 32, 3))), 0, 255).astype(np.uint8)
    assert mean_luminance(dark) == pytest.approx(0.118, abs=0.005)
    brightened = gamma_correct(dark)
    assert brightened.shape == dark.shape and brightened.dtype == np.uint8
    # gamma = log 0.5 / log 0.118 = 0.32; narrow histogram, so the mean lands near 0.5 (0.496)
    assert mean_luminance(brightened) == pytest.approx(0.5, abs=0.02)


def test_gamma_correct_explicit_gamma_by_hand():
    img = np.array([[[0, 64, 255]]], np.uint8)
    # 255 * (64 / 255) ** 0.5 = sqrt(64 * 255) = sqrt(16320) = 127.75 -> 128; 0 and 255 are fixed points
    np.testing.assert_array_equal(gamma_correct(img, gamma=0.5), [[[0, 128, 255]]])


def test_gamma_correct_leaves_bright_images_and_clamps_black_ones():
    bright = np.full((4, 4, 3), 200, np.uint8)
    np.testing.assert_array_equal(gamma_correct(bright), bright)  # mean >= 0.5: gamma clamped to 1
    black = np.zeros((4, 4, 3), np.uint8)
    np.testing.assert_array_equal(gamma_correct(black), black)  # gamma 0.1, and 0 ** 0.1 = 0
    with pytest.raises(ValueError, match="gamma must be > 0"):
        gamma_correct(bright, gamma=0)


# --- CLAHE -------------------------------------------------------------------


def test_clahe_raises_contrast_and_keeps_colours():
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    noise = np.random.default_rng(0).normal(0, 3, (64, 64, 3))
    low = np.clip(np.round(110 + 20 * np.stack([xx, yy, xx * yy], axis=-1) + noise), 0, 255).astype(np.uint8)
    out = clahe(low)
    assert out.shape == low.shape and out.dtype == np.uint8
    # luminance spread: about 4.8 grey levels in, 48 out
    assert luma(out).std() > 3 * luma(low).std()
    # Cb and Cr are carried over: only uint8 rounding (and rare clipping) moves them
    chroma_change = np.abs(rgb2ycbcr(out)[..., 1:] - rgb2ycbcr(low)[..., 1:])
    assert chroma_change.mean() < 0.1


def test_clahe_of_a_flat_image_is_the_identity():
    flat = np.full((8, 8, 3), (100, 120, 140), np.uint8)
    np.testing.assert_array_equal(clahe(flat), flat)


# --- average fusion ----------------------------------------------------------


def test_average_fusion_is_exact_and_rounds_half_up():
    ir = np.array([[0, 1, 2], [255, 254, 100]], np.uint8)
    vi = np.array([[0, 2, 3], [255, 255, 0]], np.uint8)
    # (0+0)/2 = 0, (1+2)/2 = 1.5 -> 2, (2+3)/2 = 2.5 -> 3, 255 (no uint8 wrap), 254.5 -> 255, 50
    expected = np.array([[0, 2, 3], [255, 255, 50]], np.uint8)
    fused = average_fusion(ir, vi)
    assert fused.dtype == np.uint8
    np.testing.assert_array_equal(fused, expected)
    np.testing.assert_array_equal(average_fusion(ir[..., None], vi[..., None]), expected)


def test_average_fusion_rejects_bad_input():
    gray = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="same"):
        average_fusion(gray, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="vi must be a uint8"):
        average_fusion(gray, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="ir must be a uint8"):
        average_fusion(gray.astype(np.float32), gray)
