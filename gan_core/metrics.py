"""PSNR and SSIM with BasicSR 1.4.2's exact definitions, on RGB images.

The numpy functions (`psnr`, `ssim`) reproduce `basicsr.metrics.calculate_psnr`
/ `calculate_ssim` on uint8 images, the ones papers report; the batched tensor
functions (`psnr_batch`, `ssim_batch`) reproduce `calculate_psnr_pt` /
`calculate_ssim_pt`, for quick validation on float outputs.

Differences from BasicSR, on purpose: our images are RGB, so the Y channel uses
the RGB order of the BT.601 coefficients (BasicSR reads BGR with cv2); cv2 is
not needed (its 11x11 `filter2D` followed by the [5:-5, 5:-5] crop is a
'valid' correlation, done here with scipy).

Precision follows BasicSR step by step: the Y conversion runs on float32
(`img.astype(float32) / 255`, BT.601 dot product, back to float32), everything
after it in float64. The tensor versions do not quantise: they compare the
float tensors as given (BasicSR's own validation instead rounds outputs to
uint8 with `tensor2img` and uses the numpy metrics), and `psnr_batch` adds
1e-8 to the MSE as `calculate_psnr_pt` does (identical images give 80 dB,
whereas `psnr` returns inf).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def gaussian_window(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """2-D SSIM window, the outer product of `gaussian_kernel` with itself (as BasicSR).

    Args:
        size: Odd window side.
        sigma: Standard deviation in pixels.

    Returns:
        (size, size) float64 array summing to 1.
    """
    kernel = gaussian_kernel(size, sigma)
    return np.outer(kernel, kernel)


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


def rgb_to_y_batch(images: torch.Tensor) -> torch.Tensor:
    """Y channel of (N, 3, H, W) RGB in [0, 1], as BasicSR's rgb2ycbcr_pt(y_only=True).

    Args:
        images: (N, 3, H, W) float tensor in [0, 1].

    Returns:
        (N, 1, H, W) Y in [16/255, 235/255], in the input's dtype.
    """
    weight = torch.tensor(Y_COEFFS_RGB).view(3, 1).to(images)
    return (torch.matmul(images.permute(0, 2, 3, 1), weight).permute(0, 3, 1, 2) + 16.0) / 255.0


def _prepare_batch(
    pred: torch.Tensor, target: torch.Tensor, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"Image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 4 or pred.shape[1] not in (1, 3):
        raise ValueError(f"Expected (N, 3 or 1, H, W) tensors, got {tuple(pred.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        pred = pred[:, :, crop_border:-crop_border, crop_border:-crop_border]
        target = target[:, :, crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and pred.shape[1] == 3:
        pred, target = rgb_to_y_batch(pred), rgb_to_y_batch(target)
    return pred.to(torch.float64), target.to(torch.float64)


@torch.no_grad()
def psnr_batch(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR of float tensors, as BasicSR 1.4.2's calculate_psnr_pt.

    No quantisation to uint8; 1e-8 is added to the MSE (so identical images
    give 80 dB, not inf).

    Args:
        pred: (N, 3, H, W) or (N, 1, H, W) images in [0, 1].
        target: Same shape.
        crop_border: Pixels dropped at each edge.
        y_channel: Compare the BT.601 Y channel only (RGB input).

    Returns:
        (N,) float64 PSNR in dB, on the input's device.

    Raises:
        ValueError: Shapes differ or are not (N, 3|1, H, W).
    """
    pred, target = _prepare_batch(pred, target, crop_border, y_channel)
    mse = torch.mean((pred - target) ** 2, dim=[1, 2, 3])
    return 10.0 * torch.log10(1.0 / (mse + 1e-8))


@torch.no_grad()
def ssim_batch(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM of float tensors, as BasicSR 1.4.2's calculate_ssim_pt.

    Args:
        pred: (N, 3, H, W) or (N, 1, H, W) images in [0, 1].
        target: Same shape.
        crop_border: Pixels dropped at each edge.
        y_channel: Compare the BT.601 Y channel only (RGB input).

    Returns:
        (N,) float64 SSIM (mean over channels and the valid region).

    Raises:
        ValueError: Shapes differ or are not (N, 3|1, H, W), or the images are
            smaller than the 11x11 window plus one pixel.
    """
    pred, target = _prepare_batch(pred, target, crop_border, y_channel)
    if min(pred.shape[2:]) <= SSIM_WINDOW_SIZE - 1:
        raise ValueError(
            f"SSIM needs images larger than {SSIM_WINDOW_SIZE - 1} px per side, got {tuple(pred.shape[2:])}"
        )
    pred, target = pred * 255.0, target * 255.0
    channels = pred.shape[1]
    kernel = torch.from_numpy(gaussian_kernel()).to(pred)
    # Separable window (BasicSR convolves with the 11x11 outer product; two
    # 1-D passes give the same sums up to float64 rounding, 5x cheaper).
    kernel_h = kernel.view(1, 1, SSIM_WINDOW_SIZE, 1).expand(channels, 1, SSIM_WINDOW_SIZE, 1)
    kernel_w = kernel.view(1, 1, 1, SSIM_WINDOW_SIZE).expand(channels, 1, 1, SSIM_WINDOW_SIZE)

    def filt(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, kernel_h, groups=channels)  # valid mode, as BasicSR's padding=0
        return F.conv2d(x, kernel_w, groups=channels)

    mu1, mu2 = filt(pred), filt(target)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = filt(pred * pred) - mu1_sq
    sigma2_sq = filt(target * target) - mu2_sq
    sigma12 = filt(pred * target) - mu1_mu2
    cs_map = (2 * sigma12 + SSIM_C2) / (sigma1_sq + sigma2_sq + SSIM_C2)
    ssim_map = ((2 * mu1_mu2 + SSIM_C1) / (mu1_sq + mu2_sq + SSIM_C1)) * cs_map
    return ssim_map.mean(dim=[1, 2, 3])
