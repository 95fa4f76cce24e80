"""What differs between the enhancement tasks, one class per task.

A task decides how a training pair is made from a sampled patch, how a held-out example becomes a validation
pair, which metrics score an output (with which classical baseline scored alongside), what the generator's
content loss compares, and what the sample grid shows. Everything else (the sampler, the step, the loop, the
jobs) is the same for every task and asks `build_task(cfg)`.

Examples, as the sampler and the validation hand them over (see gan_core.data.paired):
- unpaired: a clean uint8 image H x W x 3; the task makes the input (SR: bicubic or `data.degradation`;
  denoise: noise; lowlight: darkening). Fusion has no unpaired form.
- paired: uint8 H x W x 6, the input's RGB then the target's RGB (noisy | clean, low | high, IR | visible).

    task = build_task(cfg)
    lq, gt = task.train_pair(patches, generator)     # patches (B, 3 or 6, p, p) float in [0, 1]
    lq, gt = task.val_pair(example)                  # (1, C_in, h, w), (1, C_out, H, W)
    sums = task.score(output, lq, gt)                # metric sums of one image (see TASK_METRIC_KEYS)

Channels: RGB tasks keep 3; `task.gray` (denoise, lowlight) works on full-range luma (1 channel); fusion feeds
(IR, visible luma) as 2 channels and outputs the fused luma, and D compares it with the visible luma (FusionGAN,
Ma et al. 2019, Information Fusion 48).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gan_core.config import Config
from gan_core.data import bicubic_upscale, validation_pair
from gan_core.data.pairs import make_lq, to_chw_uint8
from gan_core.metrics import psnr, ssim
from gan_core.task_config import TASK_METRIC_KEYS, TaskSection

Pair = tuple[torch.Tensor, torch.Tensor]
PixelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LUMA = (0.299, 0.587, 0.114)  # full-range BT.601 luma, as PIL's convert("L")


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) full-range luma, same range as the input."""
    weights = torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) float in [0, 1] -> uint8 H x W x 3 (C = 3) or H x W (C = 1), rounded as BasicSR's
    tensor2img."""
    img = img.detach().float().squeeze(0).clamp(0, 1)
    array = (img.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return array[..., 0] if array.shape[2] == 1 else array


def to_rgb_uint8(img: torch.Tensor) -> np.ndarray:
    """As to_uint8, a gray image repeated to 3 channels (for sample grids)."""
    array = to_uint8(img)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def split_example(example: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(B, 3 or 6, H, W) -> (input or None, target): a paired example holds the input's channels first."""
    if example.shape[1] == 6:
        return example[:, :3], example[:, 3:]
    if example.shape[1] == 3:
        return None, example
    raise ValueError(f"expected examples of 3 (image) or 6 (input and target) channels, got {example.shape[1]}")


def mod_crop(example: np.ndarray | torch.Tensor, multiple: int) -> torch.Tensor:
    """uint8 H x W x C (or C x H x W tensor) -> float (1, C, H', W') in [0, 1], H' and W' multiples of `multiple`
    (a x1 RRDB unshuffles its input by 4).

    Raises:
        ValueError: the image is smaller than `multiple`.
    """
    chw = to_chw_uint8(example, pairs=True)
    height, width = chw.shape[1] // multiple * multiple, chw.shape[2] // multiple * multiple
    if height == 0 or width == 0:
        raise ValueError(f"image {tuple(chw.shape[1:])} is smaller than {multiple} px")
    return chw[:, :height, :width].float().div_(255.0).unsqueeze(0)


def example_seed(example: np.ndarray | torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by `seed` and the pixels, so a held-out image gets the same synthetic input whichever
    worker scores it, in whatever order."""
    pixels = example.numpy() if isinstance(example, torch.Tensor) else example
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(np.ascontiguousarray(pixels).tobytes()))


def _uniform(bounds: tuple[float, float], n: int, generator: torch.Generator | None) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator)  # (n,)


def restoration_sums(out: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM (BasicSR's definitions, no border crop: the size is unchanged) of the output, and of the input
    itself as the baseline (`input_*`)."""
    out_img, lq_img, gt_img = to_uint8(out), to_uint8(lq), to_uint8(gt)
    return {
        "psnr": psnr(out_img, gt_img), "ssim": ssim(out_img, gt_img),
        "psnr_y": psnr(out_img, gt_img, y_channel=True), "ssim_y": ssim(out_img, gt_img, y_channel=True),
        "input_psnr_y": psnr(lq_img, gt_img, y_channel=True), "input_ssim_y": ssim(lq_img, gt_img, y_channel=True),
    }


@dataclass(frozen=True)
class SuperResolution:
    """x2 / x4 super-resolution: the input is the bicubic (or `data.degradation`) downscale of the clean patch;
    scored against bicubic upscaling, border cropped by the scale (BasicSR). With `blind` (data.blind) the
    sampler hands over HR patches only and the LR is made on the device (gan_core.data.realesrgan); validation
    degrades each held-out image reproducibly (`BlindValidationPairs`)."""

    scale: int
    degradation: dict | None = None
    blind: object | None = None  # a BlindDegradationSection
    seed: int = 0
    name: str = "sr"
    output_channels: int = 3
    baseline: str = "bicubic"
    gain: tuple[str, str, str] = ("gain_psnr_y", "psnr_y", "bicubic_psnr_y")

    def train_pair(self, patches: torch.Tensor, generator: torch.Generator | None) -> Pair:
        lq_given, gt = split_example(patches)
        if lq_given is not None:
            raise ValueError("task sr makes its LR input from the HR image: train on unpaired images")
        return make_lq(gt, self.scale, self.degradation, generator), gt

    def val_pair(self, example, scale: int | None = None) -> Pair:
        if self.blind is not None:
            from gan_core.scoring import BlindValidationPairs

            return BlindValidationPairs(self.blind, seed=self.seed)(example, self.scale)
        return validation_pair(example, self.scale)

    def score(self, out: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        from gan_core.scoring import hf_ratio

        crop = self.scale
        sr_img, gt_img, bicubic_img = to_uint8(out), to_uint8(gt), to_uint8(bicubic_upscale(lq.cpu(), self.scale))
        return {
            "psnr": psnr(sr_img, gt_img, crop_border=crop), "ssim": ssim(sr_img, gt_img, crop_border=crop),
            "psnr_y": psnr(sr_img, gt_img, crop_border=crop, y_channel=True),
            "ssim_y": ssim(sr_img, gt_img, crop_border=crop, y_channel=True),
            "bicubic_psnr_y": psnr(bicubic_img, gt_img, crop_border=crop, y_channel=True),
            "bicubic_ssim_y": ssim(bicubic_img, gt_img, crop_border=crop, y_channel=True),
            "hf_ratio": hf_ratio(sr_img, gt_img, crop_border=crop),
            "bicubic_hf_ratio": hf_ratio(bicubic_img, gt_img, crop_border=crop),
        }

    def content_loss(self, fake: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor, pixel: PixelLoss) -> torch.Tensor:
        return pixel(fake, gt)

    def panels(self, lq: torch.Tensor, out: torch.Tensor, gt: torch.Tensor) -> list[np.ndarray]:
        """LR (nearest-upscaled) | output | HR."""
        return [to_rgb_uint8(F.interpolate(lq, scale_factor=self.scale, mode="nearest")), to_rgb_uint8(out),
                to_rgb_uint8(gt)]


@dataclass(frozen=True)
class Restoration:
    """Denoising and low-light enhancement at x1. Paired examples are used as they are; a clean image gets a
    synthetic input (`make_input`). Validation of clean images uses a synthetic input seeded per image."""

    section: TaskSection
    seed: int = 0

    @property
    def name(self) -> str:
        return self.section.name

    @property
    def output_channels(self) -> int:
        return self.section.channels[1]

    baseline: str = "input"
    gain: tuple[str, str, str] = ("gain_psnr_y", "psnr_y", "input_psnr_y")

    def train_pair(self, patches: torch.Tensor, generator: torch.Generator | None) -> Pair:
        given, gt = split_example(patches)
        lq = given if given is not None else None
        if self.section.gray:
            gt, lq = luma(gt), (luma(lq) if lq is not None else None)
        if lq is None:
            lq = self.make_input(gt, generator, validation=False)
        return lq, gt

    def val_pair(self, example, scale: int | None = None) -> Pair:
        given, gt = split_example(mod_crop(example, 4))
        if self.section.gray:
            gt, given = luma(gt), (luma(given) if given is not None else None)
        if given is not None:
            return given, gt
        # Quantised to 8 bits, as an input read from a file is.
        lq = self.make_input(gt, example_seed(example, self.seed), validation=True)
        return lq.mul(255.0).round_().div_(255.0), gt

    def make_input(self, clean: torch.Tensor, generator: torch.Generator | None, validation: bool) -> torch.Tensor:
        """The synthetic input of clean (B, C, H, W) images: noise (denoise) or darkening (lowlight)."""
        if self.name == "denoise":
            return add_noise(clean, self.section, generator, validation)
        return darken(clean, self.section, generator)

    def score(self, out: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        return restoration_sums(out, lq, gt)

    def content_loss(self, fake: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor, pixel: PixelLoss) -> torch.Tensor:
        return pixel(fake, gt)

    def panels(self, lq: torch.Tensor, out: torch.Tensor, gt: torch.Tensor) -> list[np.ndarray]:
        """Input | output | target."""
        return [to_rgb_uint8(lq), to_rgb_uint8(out), to_rgb_uint8(gt)]


def add_noise(clean: torch.Tensor, section: TaskSection, generator: torch.Generator | None,
              validation: bool = False) -> torch.Tensor:
    """Gaussian (sigma per image from `noise_sigma`, on 0-255) or Poisson (strength from `poisson_scale`) noise,
    or each at random (`mixed`); with `gray_noise_prob`, the same noise on every channel. Validation uses
    Gaussian noise at `val_noise_sigma` (the benchmark setting), or Poisson at the middle strength."""
    batch, channels = clean.shape[:2]
    gray = torch.rand(batch, generator=generator) < section.gray_noise_prob  # (B,)
    if section.noise == "mixed":
        gaussian = torch.rand(batch, generator=generator) < 0.5
    else:
        gaussian = torch.full((batch,), section.noise == "gaussian")
    if validation:
        sigma = torch.full((batch,), section.val_noise_sigma)
        strength = torch.full((batch,), sum(section.poisson_scale) / 2)
    else:
        sigma, strength = _uniform(section.noise_sigma, batch, generator), _uniform(section.poisson_scale, batch, generator)
    noise_channels = torch.randn(clean.shape, generator=generator)  # (B, C, H, W)
    noise_gray = torch.randn((batch, 1, *clean.shape[2:]), generator=generator).expand_as(clean)
    white = torch.where(gray.view(-1, 1, 1, 1), noise_gray, noise_channels) * (sigma / 255.0).view(-1, 1, 1, 1)
    # Shot noise: photon counts Poisson(255 * value), the deviation scaled by the strength (Real-ESRGAN's).
    counts_rgb = torch.poisson(clean.cpu().clamp(0, 1) * 255.0, generator=generator)
    gray_clean = clean.cpu().clamp(0, 1).mean(dim=1, keepdim=True)
    counts_gray = torch.poisson(gray_clean * 255.0, generator=generator).expand_as(clean)
    shot = torch.where(gray.view(-1, 1, 1, 1), counts_gray / 255.0 - gray_clean, counts_rgb / 255.0 - clean.cpu())
    shot = shot * strength.view(-1, 1, 1, 1)
    noise = torch.where(gaussian.view(-1, 1, 1, 1), white, shot).to(clean.device, clean.dtype)
    return (clean + noise).clamp_(0.0, 1.0)


def darken(clean: torch.Tensor, section: TaskSection, generator: torch.Generator | None) -> torch.Tensor:
    """Synthetic low light: scale * clean ** gamma plus Gaussian sensor noise, per image from the ranges (the
    gamma-and-scale model of Lv et al. 2018 (MBLLEN) and LLFlow's synthetic pairs)."""
    batch = clean.shape[0]
    gamma = _uniform(section.dark_gamma, batch, generator).view(-1, 1, 1, 1)
    scale = _uniform(section.dark_scale, batch, generator).view(-1, 1, 1, 1)
    sigma = _uniform(section.dark_noise_sigma, batch, generator).view(-1, 1, 1, 1) / 255.0
    noise = torch.randn(clean.shape, generator=generator) * sigma
    dark = scale * clean.cpu().clamp(0, 1) ** gamma + noise
    return dark.clamp_(0.0, 1.0).to(clean.device, clean.dtype)


@dataclass(frozen=True)
class Fusion:
    """Infrared + visible fusion (FusionGAN, Ma et al. 2019): G takes (IR, visible luma) stacked, outputs the fused
    luma; the content loss keeps the IR intensities and the visible gradients; D separates the fused image from the
    visible one (the batch's `gt`). Scored with EN, SD, SF, MI and Q^AB/F (gan_core.fusion_metrics), the plain
    average of the two inputs alongside as the baseline."""

    section: TaskSection
    name: str = "fusion"
    output_channels: int = 1
    baseline: str = "average"
    gain: tuple[str, str, str] = ("gain_qabf", "qabf", "average_qabf")

    def train_pair(self, patches: torch.Tensor, generator: torch.Generator | None) -> Pair:
        return self._pair(patches)

    def val_pair(self, example, scale: int | None = None) -> Pair:
        return self._pair(mod_crop(example, 4))

    def _pair(self, example: torch.Tensor) -> Pair:
        ir, vi = split_example(example)
        if ir is None:
            raise ValueError("task fusion needs paired infrared and visible images (ir/ and vi/ folders, or shards "
                             "written from them by `python -m jobs.prepare_data --task fusion`)")
        visible = luma(vi)  # (B, 1, H, W)
        return torch.cat([ir[:, :1], visible], dim=1), visible  # IR is gray: its first channel

    def score(self, out: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
        from gan_core.baselines import average_fusion
        from gan_core.fusion_metrics import fusion_metrics

        ir, vi, fused = to_uint8(lq[:, :1]), to_uint8(lq[:, 1:2]), to_uint8(out)
        sums = fusion_metrics(ir, vi, fused)
        sums |= {f"average_{key}": value for key, value in fusion_metrics(ir, vi, average_fusion(ir, vi)).items()}
        return sums

    def content_loss(self, fake: torch.Tensor, lq: torch.Tensor, gt: torch.Tensor, pixel: PixelLoss) -> torch.Tensor:
        from gan_core.losses.fusion import fusion_content_loss, max_content_loss

        loss = max_content_loss if self.section.fusion_loss == "max" else fusion_content_loss
        return loss(fake, lq[:, :1].to(fake.dtype), lq[:, 1:2].to(fake.dtype),
                    intensity_weight=self.section.fusion_intensity_weight,
                    gradient_weight=self.section.fusion_gradient_weight)

    def panels(self, lq: torch.Tensor, out: torch.Tensor, gt: torch.Tensor) -> list[np.ndarray]:
        """IR | visible | fused."""
        return [to_rgb_uint8(lq[:, :1]), to_rgb_uint8(lq[:, 1:2]), to_rgb_uint8(out)]


Task = SuperResolution | Restoration | Fusion


def build_task(cfg: Config) -> Task:
    """The task of a run config."""
    if cfg.task.name == "sr":
        if cfg.data.blind is not None:
            return SuperResolution(scale=cfg.generator.scale, blind=cfg.data.blind, seed=cfg.train.seed)
        return SuperResolution(scale=cfg.generator.scale, degradation=cfg.data.degradation.model_dump())
    return task_from_section(cfg.task, cfg.generator.scale, cfg.train.seed)


def task_from_section(section: TaskSection, scale: int = 1, seed: int = 0) -> Task:
    """The task of a `task` section alone (what a generator file records, `checkpoint.generator_task`): SR with
    bicubic inputs, or the section's task."""
    if section.name == "sr":
        return SuperResolution(scale=scale)
    if section.name == "fusion":
        return Fusion(section)
    return Restoration(section, seed=seed)


def metric_keys(task_name: str) -> tuple[str, ...]:
    """The validation metrics a task reports (without `val/`)."""
    return TASK_METRIC_KEYS[task_name]
