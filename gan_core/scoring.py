"""Scoring a generator on whole held-out images with BasicSR's metric definitions, and the bicubic baseline.

Training validation (`gan_core.loop`) and the evaluate / promote / export / import jobs all score here.
Results come back as sums with a count, so that workers can each score a slice of the validation set
and all-reduce (nobody waits for rank 0 to do all of it); `mean_metrics` turns them into means.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gan_core.data import (
    ImageDecodeError,
    bicubic_upscale,
    find_image_files,
    load_image,
    load_shard_images,
    validation_pair,
)
from gan_core.metrics import psnr, rgb_to_y, ssim
from gan_core.weights import MissingWeightsError

METRIC_KEYS = ("psnr", "ssim", "psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "hf_ratio", "bicubic_hf_ratio")
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
                       lpips: nn.Module | None = None, make_pair: PairMaker = validation_pair) -> dict[str, float]:
    """Mean metrics of `generator` on HR `images` at its own scale, plus `images`, the count."""
    generator = generator.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device)
    means = mean_metrics(evaluate_images(generator, images, int(generator.scale), device, lpips=lpips,
                                         make_pair=make_pair))
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


# A 3x3 Laplacian: what it keeps of an image is its highest spatial frequencies (edges, texture, noise).
LAPLACIAN_3X3 = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency_energy(img: np.ndarray, crop_border: int = 0) -> float:
    """Mean squared 3x3 Laplacian of the Y channel (0-255 scale) of an HxWx3 RGB image.

    The Laplacian is taken on the valid interior (no padding) after cropping `crop_border` pixels.
    """
    y = rgb_to_y(img).astype(np.float64)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    k = LAPLACIAN_3X3
    lap = sum(k[i, j] * y[i : y.shape[0] - 2 + i, j : y.shape[1] - 2 + j]
              for i in range(3) for j in range(3) if k[i, j])
    return float(np.mean(lap * lap))


def hf_ratio(img: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> float:
    """How much high-frequency energy `img` holds relative to `reference` (the HR image).

    hf_ratio = E(img) / E(reference), with E the mean squared 3x3 Laplacian of the Y channel
    (`high_frequency_energy`), both cropped by `crop_border`. 1.0: as much fine detail as the HR image;
    bicubic upscaling of an x4 LR input gives far less (about 0.1 on photos); above 1: more than the HR
    image (noise, ringing, GAN artefacts). It measures sharpness, not fidelity: pair it with PSNR/SSIM.
    A flat reference (E = 0) gives 1.0 when `img` is flat too, else inf.
    """
    if img.shape != reference.shape:
        raise ValueError(f"Image shapes differ: {img.shape} vs {reference.shape}")
    energy, ref_energy = high_frequency_energy(img, crop_border), high_frequency_energy(reference, crop_border)
    if ref_energy == 0:
        return 1.0 if energy == 0 else float("inf")
    return energy / ref_energy


PairMaker = Callable[[np.ndarray, int], tuple[torch.Tensor, torch.Tensor]]  # (HR uint8 HxWx3, scale) -> (lq, gt)


class BlindValidationPairs:
    """Held-out pairs degraded by Real-ESRGAN's second-order pipeline (`data.blind`), reproducibly.

    Each HR image is mod-cropped to the scale and degraded by a `SecondOrderDegradation` seeded by `seed`
    and a CRC-32 of the image's pixels, so an image gets the same LR input whichever worker scores it, in
    whatever order, in every run with the same seed. The target stays the unsharpened HR image.

        pairs = BlindValidationPairs(cfg.data.blind, seed=0)
        lq, gt = pairs(hr, 4)          # (1, 3, H/4, W/4), (1, 3, H, W) floats in [0, 1]
    """

    def __init__(self, blind: Any, seed: int = 0):
        """Args:
            blind: a `BlindDegradationSection` (the run's `data.blind`).
            seed: the evaluation seed (independent of training's).
        """
        self.blind, self.seed = blind, seed

    def __call__(self, hr: np.ndarray, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        from gan_core.data.realesrgan import SecondOrderDegradation

        _, gt = validation_pair(hr, scale)
        content = zlib.crc32(np.ascontiguousarray(hr).tobytes())
        degrade = SecondOrderDegradation(scale=scale, seed=self.seed, rank=content, **self.blind.degradation_kwargs())
        return degrade(gt), gt


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
    make_pair: PairMaker = validation_pair,
) -> dict[str, float]:
    """Score `generator` on HR images degraded with MATLAB-style bicubic downscaling (or `make_pair`).

    PSNR/SSIM are computed on uint8 images, RGB and Y channel, with crop border = scale, exactly
    as BasicSR; the bicubic upscale of the same LR input is scored alongside as the baseline.
    `hf_ratio` (see `hf_ratio`) is the output's high-frequency energy over the HR image's, per image.

    Args:
        generator: the model to score (put in eval mode by the caller).
        images: HR images, uint8 HxWx3 RGB.
        scale: the super-resolution factor.
        device: where to run the generator.
        lpips: an LPIPS module; its `metric_name` names the summed key.
        bf16: run the generator under bf16 autocast.
        make_pair: makes (lq, gt) of an HR image; `BlindValidationPairs` for blind SR. The bicubic baseline
            always upscales the same lq.

    Returns:
        Sums over the images of each metric in METRIC_KEYS (plus the LPIPS key), and `count`.
    """
    sums = {key: 0.0 for key in METRIC_KEYS}
    if lpips is not None:
        sums[lpips.metric_name] = 0.0
    for hr in images:
        lq, gt = make_pair(hr, scale)
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
        sums["hf_ratio"] += hf_ratio(sr_img, gt_img, crop_border=scale)
        sums["bicubic_hf_ratio"] += hf_ratio(bicubic_img, gt_img, crop_border=scale)
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
def sample_grid(generator: nn.Module, hr: np.ndarray, scale: int, device: torch.device,
                make_pair: PairMaker = validation_pair) -> np.ndarray:
    """One validation image side by side: LR (nearest-upscaled) | output | HR, as uint8 HxWx3."""
    lq, gt = make_pair(hr, scale)
    sr = generator(lq.to(device)).float().cpu()
    lq_big = torch.nn.functional.interpolate(lq, scale_factor=scale, mode="nearest")
    return np.concatenate([to_uint8(lq_big), to_uint8(sr), to_uint8(gt)], axis=1)
