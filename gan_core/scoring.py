"""Scoring a generator on whole held-out images with BasicSR's metric definitions, and the bicubic baseline.

Training validation (`gan_core.loop`) and the evaluate / promote / export / import jobs all score here.
Results come back as sums with a count, so that workers can each score a slice of the validation set
and all-reduce (nobody waits for rank 0 to do all of it); `mean_metrics` turns them into means.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gan_core.data import ImageDecodeError, bicubic_upscale, find_image_files, load_image, load_shard_images, validation_pair
from gan_core.metrics import psnr, ssim
from gan_core.weights import MissingWeightsError

METRIC_KEYS = ("psnr", "ssim", "psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y")
# What `mean_metrics` returns: the summed keys, the gain over bicubic, and LPIPS when its weights exist.
REPORTED_KEYS = (*METRIC_KEYS, "gain_psnr_y", "lpips")
# Added by `evaluate_generator_checked`: images whose output held a NaN or Inf (scored as if black).
NONFINITE_KEY = "nonfinite_images"


def load_eval_images(path: str | Path, max_images: int | None = None, crop: int | None = None,
                     ) -> list[tuple[str, np.ndarray]]:
    """Held-out HR images from a folder of images (recursive, hidden files skipped), one image file, or
    Parquet shards; sorted, at most `max_images`, optionally centre-cropped to `crop`.

    Unreadable files are skipped with a warning on stderr.

    Raises:
        FileNotFoundError: nothing at `path`, or no readable image there.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder or file")
    if (root.is_file() and root.suffix == ".parquet") or (root.is_dir() and any(root.glob("*.parquet"))):
        named = load_shard_images(root)
    else:
        named = []
        for file in [root] if root.is_file() else find_image_files(root):
            try:
                named.append((file.name, load_image(file)))
            except ImageDecodeError as err:
                print(f"skipping image: {err}", file=sys.stderr)
    named = named[:max_images]
    if not named:
        raise FileNotFoundError(f"{root}: holds no readable images")
    return [(name, center_crop(img, crop)) for name, img in named]


def load_lpips(weights_path: str | None = None) -> tuple[nn.Module | None, str | None]:
    """The LPIPS (AlexNet) metric, or (None, why) when its backbone weights are not on this machine."""
    from gan_core.losses import LPIPS

    try:
        return LPIPS(net="alex", weights_path=weights_path), None
    except MissingWeightsError as err:
        return None, f"LPIPS skipped: {str(err).splitlines()[0]}"


def pick_device(name: str | None = None) -> torch.device:
    """`name` (cpu, cuda, cuda:1 ...), else CUDA when present, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_generator(generator: nn.Module, images: list[np.ndarray], device: torch.device,
                       lpips: nn.Module | None = None) -> dict[str, float]:
    """Mean metrics of `generator` on HR `images` at its own scale, plus `images`, the count."""
    generator = generator.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device)
    means = mean_metrics(evaluate_images(generator, images, int(generator.scale), device, lpips=lpips))
    means["images"] = float(len(images))
    return means


def evaluate_generator_checked(generator: nn.Module, images: list[np.ndarray], device: torch.device,
                               lpips: nn.Module | None = None) -> dict[str, float]:
    """`evaluate_generator`'s means plus `nonfinite_images`: how many images came out with a NaN or Inf.

    Scoring rounds outputs to uint8 (`to_uint8`), which turns NaN into black pixels with only a numpy
    RuntimeWarning, so a model with NaN weights still gets a finite PSNR. The count is taken from the
    same forward passes (a hook on the generator), so checking costs no second evaluation.

    Returns:
        The same means as `evaluate_generator`, and `nonfinite_images` (a float, like `images`).
    """
    nonfinite = []

    def count(module, inputs, output):
        nonfinite.append(not bool(torch.isfinite(output).all()))

    hook = generator.register_forward_hook(count)
    try:
        means = evaluate_generator(generator, images, device, lpips)
    finally:
        hook.remove()
    means[NONFINITE_KEY] = float(sum(nonfinite))
    return means


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> HxWx3 uint8, rounded as BasicSR's tensor2img."""
    img = img.detach().float().squeeze(0).clamp(0, 1)
    return (img.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    """Centre crop of an HxWxC array to at most size x size (None keeps it whole)."""
    if size is None:
        return img
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top : top + size, left : left + size]


@torch.no_grad()
def evaluate_images(
    generator: nn.Module,
    images: list[np.ndarray],
    scale: int,
    device: torch.device,
    *,
    lpips: nn.Module | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Score `generator` on HR images degraded with MATLAB-style bicubic downscaling.

    PSNR/SSIM are computed on uint8 images, RGB and Y channel, with crop border = scale, exactly
    as BasicSR; the bicubic upscale of the same LR input is scored alongside as the baseline.

    Args:
        generator: the model to score (put in eval mode by the caller).
        images: HR images, uint8 HxWx3 RGB.
        scale: the super-resolution factor.
        device: where to run the generator.
        lpips: an LPIPS module; its `metric_name` names the summed key.
        bf16: run the generator under bf16 autocast.

    Returns:
        Sums over the images of each metric in METRIC_KEYS (plus the LPIPS key), and `count`.
    """
    sums = {key: 0.0 for key in METRIC_KEYS}
    if lpips is not None:
        sums[lpips.metric_name] = 0.0
    for hr in images:
        lq, gt = validation_pair(hr, scale)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
        with autocast:
            sr = generator(lq.to(device)).float()
        sr_img, gt_img = to_uint8(sr), to_uint8(gt)
        bicubic_img = to_uint8(bicubic_upscale(lq, scale))
        sums["psnr"] += psnr(sr_img, gt_img, crop_border=scale)
        sums["ssim"] += ssim(sr_img, gt_img, crop_border=scale)
        sums["psnr_y"] += psnr(sr_img, gt_img, crop_border=scale, y_channel=True)
        sums["ssim_y"] += ssim(sr_img, gt_img, crop_border=scale, y_channel=True)
        sums["bicubic_psnr_y"] += psnr(bicubic_img, gt_img, crop_border=scale, y_channel=True)
        sums["bicubic_ssim_y"] += ssim(bicubic_img, gt_img, crop_border=scale, y_channel=True)
        if lpips is not None:
            sums[lpips.metric_name] += float(lpips(sr.clamp(0, 1), gt.to(device)).mean())
    sums["count"] = float(len(images))
    return sums


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Divide summed metrics by their count; add `gain_psnr_y` (dB over bicubic)."""
    count = max(sums.get("count", 0.0), 1.0)
    means = {key: value / count for key, value in sums.items() if key != "count"}
    if "psnr_y" in means:
        means["gain_psnr_y"] = means["psnr_y"] - means["bicubic_psnr_y"]
    return means


@torch.no_grad()
def sample_grid(generator: nn.Module, hr: np.ndarray, scale: int, device: torch.device) -> np.ndarray:
    """One validation image side by side: LR (nearest-upscaled) | output | HR, as uint8 HxWx3."""
    lq, gt = validation_pair(hr, scale)
    sr = generator(lq.to(device)).float().cpu()
    lq_big = torch.nn.functional.interpolate(lq, scale_factor=scale, mode="nearest")
    return np.concatenate([to_uint8(lq_big), to_uint8(sr), to_uint8(gt)], axis=1)
