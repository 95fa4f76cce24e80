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
    find_image_files,
    load_image,
    load_shard_images,
    validation_pair,
)
from gan_core.metrics import rgb_to_y
from gan_core.task_config import TASK_METRIC_KEYS
from gan_core.tasks import SuperResolution, Task, to_uint8  # noqa: F401 (to_uint8 re-exported)
from gan_core.weights import MissingWeightsError

METRIC_KEYS = TASK_METRIC_KEYS["sr"][:-2]  # super-resolution's summed keys (other tasks: TASK_METRIC_KEYS)
# What `mean_metrics` returns: the summed keys, the gain over bicubic, and LPIPS when its weights exist.
REPORTED_KEYS = tuple(dict.fromkeys(key for keys in TASK_METRIC_KEYS.values() for key in keys))  # every task's
# Added by `evaluate_generator_checked`: images whose output held a NaN or Inf (scored as if black).
NONFINITE_KEY = "nonfinite_images"


def load_eval_images(path: str | Path, max_images: int | None = None, crop: int | None = None,
                     task: str = "sr") -> list[tuple[str, np.ndarray]]:
    """Held-out examples from a folder of images (recursive, hidden files skipped), one image file, Parquet
    shards, or (denoise, lowlight, fusion) a paired folder in the task's layout (noisy/ clean/, low/ high/,
    ir/ vi/: H x W x 6 examples, gan_core.data.paired); sorted, at most `max_images`, optionally centre-cropped
    to `crop`.

    Unreadable files, and pairs that cannot be used (no partner, two sizes, a colour infrared image), are
    skipped with a warning on stderr.

    Raises:
        FileNotFoundError: nothing at `path`, no readable image there, or (fusion) no ir/ and vi/ folders.
    """
    from gan_core.data.paired import PAIR_LAYOUTS, is_paired_folder, load_pairs

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder or file")
    if (root.is_file() and root.suffix == ".parquet") or (root.is_dir() and any(root.glob("*.parquet"))):
        named = load_shard_images(root)
    elif task in PAIR_LAYOUTS and (task == "fusion" or is_paired_folder(root, task)):
        named, problems = load_pairs(root, task, gray_input=task == "fusion")  # fusion has no unpaired form
        for name, reason in problems:
            print(f"skipping pair {name}: {reason}", file=sys.stderr)
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
                       lpips: nn.Module | None = None, make_pair: PairMaker | None = None,
                       task: Task | None = None) -> dict[str, float]:
    """Mean metrics of `generator` on held-out `images` at its own scale (the task's metrics, super-resolution by
    default), plus `images`, the count."""
    generator = generator.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device)
    means = mean_metrics(evaluate_images(generator, images, int(generator.scale), device, lpips=lpips,
                                         make_pair=make_pair, task=task))
    means["images"] = float(len(images))
    return means


def evaluate_generator_checked(generator: nn.Module, images: list[np.ndarray], device: torch.device,
                               lpips: nn.Module | None = None, task: Task | None = None) -> dict[str, float]:
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
        means = evaluate_generator(generator, images, device, lpips, task=task)
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
    make_pair: PairMaker | None = None,
    task: Task | None = None,
) -> dict[str, float]:
    """Score `generator` on held-out examples with the task's metrics and baseline (gan_core.tasks).

    Super-resolution (the default task): HR images degraded with MATLAB-style bicubic downscaling (or
    `make_pair`); PSNR/SSIM on uint8 images, RGB and Y channel, crop border = scale, exactly as BasicSR; the
    bicubic upscale of the same LR input scored alongside; `hf_ratio` (see `hf_ratio`) per image. Other tasks
    score as their `score` says (TASK_METRIC_KEYS).

    Args:
        generator: the model to score (put in eval mode by the caller).
        images: held-out examples: uint8 H x W x 3 images, or H x W x 6 pairs (gan_core.tasks).
        scale: the super-resolution factor (1 for the other tasks).
        device: where to run the generator.
        lpips: an LPIPS module; its `metric_name` names the summed key (RGB outputs only).
        bf16: run the generator under bf16 autocast.
        make_pair: makes (lq, gt) of an example instead of the task's `val_pair` (e.g. `BlindValidationPairs`).
        task: the task (default: super-resolution at `scale`).

    Returns:
        Sums over the images of each metric (plus the LPIPS key), and `count`.
    """
    task = task or SuperResolution(scale=scale)
    make_pair = make_pair or task.val_pair
    # Every key from the start, also for a worker whose slice is empty: the workers all-reduce the same keys.
    summed = [key for key in TASK_METRIC_KEYS[task.name] if not key.startswith("gain_") and key != "lpips"]
    sums: dict[str, float] = dict.fromkeys(summed, 0.0)
    if lpips is not None and task.output_channels == 3:
        sums[lpips.metric_name] = 0.0
    for example in images:
        lq, gt = make_pair(example, scale)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
        with autocast:
            out = generator(lq.to(device)).float()
        scores = task.score(out.cpu(), lq, gt)
        if lpips is not None and task.output_channels == 3:
            scores[lpips.metric_name] = float(lpips(out.clamp(0, 1), gt.to(device)).mean())
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + value
    sums["count"] = float(len(images))
    return sums


# (metric, baseline): mean_metrics adds gain_<metric>, the output's metric minus its baseline's.
GAINS = (("psnr_y", "bicubic_psnr_y"), ("psnr_y", "input_psnr_y"), ("qabf", "average_qabf"))


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Divide summed metrics by their count; add the gain over the task's baseline (`GAINS`): `gain_psnr_y`
    (dB over bicubic, or over the input) or `gain_qabf` (over the average of the fusion inputs)."""
    count = max(sums.get("count", 0.0), 1.0)
    means = {key: value / count for key, value in sums.items() if key != "count"}
    for metric, baseline in GAINS:
        if metric in means and baseline in means:
            means[f"gain_{metric}"] = means[metric] - means[baseline]
    return means


@torch.no_grad()
def sample_grid(generator: nn.Module, example: np.ndarray, scale: int, device: torch.device,
                make_pair: PairMaker | None = None, task: Task | None = None) -> np.ndarray:
    """One held-out example side by side as uint8 H x W x 3, as the task shows it: LR (nearest-upscaled) |
    output | HR for super-resolution, input | output | target, or IR | visible | fused."""
    task = task or SuperResolution(scale=scale)
    lq, gt = (make_pair or task.val_pair)(example, scale)
    out = generator(lq.to(device)).float().cpu()
    return np.concatenate(task.panels(lq, out, gt), axis=1)
