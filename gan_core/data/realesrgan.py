"""Real-ESRGAN's second-order degradation (Wang et al. 2021) and its training-pair pool, batched on the
device where the model trains.

The pipeline of BasicSR 1.4.2's RealESRGANModel.feed_data, on a batch of GT patches:

    gt ──USM sharpen──> blur (kernel1) ─> random resize ─> Gaussian or Poisson noise ─> JPEG      (first order)
       ─> blur (kernel2, with blur_prob) ─> resize ─> noise ─> JPEG                                 (second order)
       ─> [resize to gt / scale + final sinc] and JPEG, in random order ─> clamp, round to 8 bits ─> lq

Blur kernels, final sinc kernels, noise levels and JPEG qualities are drawn per image; the resize
factor and mode, and Gaussian-or-Poisson, per batch (as Real-ESRGAN, which is why it mixes pairs of
several batches in a pool). Parameters come from a CPU torch.Generator, noise tensors from a generator
on the batch's device; both are seeded from (seed, rank) and saved by state_dict(), so a resumed run
draws the same degradations as an uninterrupted one (on the same kind of device).

    blind = BlindPairs.from_section(cfg.data.blind, scale=4, batch_size=12, seed=0, rank=rank)
    lq, gt = blind(gt.to(device))  # (B, 3, 64, 64), (B, 3, 256, 256)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from gan_core.config import BlindDegradationSection, DegradationOrderSection
from gan_core.data.blur_kernels import draw_blur_kernels, draw_final_sinc_kernels
from gan_core.data.jpeg import jpeg_round_trip

RESIZE_MODES = ("area", "bilinear", "bicubic")
_STREAM = 0x5EED  # keeps these seeds apart from the patch sampler's (seed, rank[, epoch]) streams


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image with its own kernel (BasicSR's filter2D): reflect padding, one grouped convolution.

    Args:
        img: (B, C, H, W).
        kernels: (B, k, k) or (1, k, k) with k odd.

    Returns:
        (B, C, H, W). Images no larger than k // 2 are padded by replication instead (reflection needs
        the padding to be smaller than the image), which BasicSR would refuse.
    """
    n, channels, height, width = img.shape
    size = kernels.shape[-1]
    if size % 2 == 0:
        raise ValueError(f"filter2d: kernel size must be odd, got {size}")
    pad = size // 2
    padded = F.pad(img, (pad, pad, pad, pad), mode="reflect" if pad < min(height, width) else "replicate")
    weight = kernels.to(device=img.device, dtype=img.dtype).expand(n, size, size)
    weight = weight.repeat_interleave(channels, dim=0).reshape(n * channels, 1, size, size)
    out = F.conv2d(padded.reshape(1, n * channels, *padded.shape[-2:]), weight, groups=n * channels)
    return out.reshape(n, channels, height, width)


def usm_sharpen(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking of a batch, Real-ESRGAN's USMSharp: sharpen where |img - blur| > threshold / 255,
    with a blurred (soft) mask. The Gaussian is OpenCV's for an odd size of radius (+1) and sigma 0, applied
    as two 1-D convolutions.

    Args:
        img: (B, C, H, W) in [0, 1].

    Returns:
        (B, C, H, W) in [0, 1].
    """
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's getGaussianKernel for sigma <= 0
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    rows = _blur_matrix(kernel, img.shape[-2]).to(device=img.device, dtype=img.dtype)  # (H, H)
    cols = _blur_matrix(kernel, img.shape[-1]).to(device=img.device, dtype=img.dtype)  # (W, W)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return rows @ x @ cols.T

    blurred = blur(img)
    residual = img - blurred
    soft_mask = blur((residual.abs() * 255 > threshold).to(img.dtype))
    sharp = (img + weight * residual).clamp(0.0, 1.0)
    return soft_mask * sharp + (1 - soft_mask) * img


def _blur_matrix(kernel: torch.Tensor, length: int) -> torch.Tensor:
    """(length, length) matrix of a 1-D convolution with reflect padding (replicate when the signal is too
    short): a matrix product beats a 51-tap single-channel convolution by ~10x on the CPU."""
    pad = kernel.numel() // 2
    basis = torch.eye(length, dtype=kernel.dtype).unsqueeze(1)  # (length, 1, length): one unit signal per row
    padded = F.pad(basis, (pad, pad), mode="reflect" if pad < length else "replicate")
    responses = F.conv1d(padded, kernel.view(1, 1, -1)).squeeze(1)  # row j: the blur of unit signal j
    return responses.T.contiguous()  # column j is the response to e_j: y = matrix @ x


def _levels(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1): per image, the number of distinct 8-bit values rounded up to a power of 2 (BasicSR's
    Poisson noise scales counts with it), counted with a histogram instead of a loop of torch.unique."""
    values = img.mul(255).round().clamp(0, 255).long().flatten(1)  # (B, C*H*W)
    present = torch.zeros(img.shape[0], 256, dtype=torch.bool, device=img.device).scatter_(1, values, True)
    distinct = present.sum(1).to(img.dtype)
    return torch.pow(2.0, torch.ceil(torch.log2(distinct))).view(-1, 1, 1, 1)


def _poisson_noise(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of the 8-bit rounded image (BasicSR's generate_poisson_noise_pt before the scale)."""
    rounded = img.mul(255).round().clamp(0, 255) / 255
    levels = _levels(rounded)
    return torch.poisson(rounded * levels, generator=generator) / levels - rounded


class SecondOrderDegradation:
    """Makes Real-ESRGAN's LR inputs from a batch of GT patches, on the batch's device.

    Keyword-constructed from the `data.blind` config section (see BlindDegradationSection for every
    setting and its Real-ESRGAN name):

        degradation = SecondOrderDegradation(scale=4, seed=0, rank=rank, **cfg.data.blind.degradation_kwargs())
    """

    def __init__(self, *, scale: int, first: DegradationOrderSection | dict, second: DegradationOrderSection | dict,
                 final_sinc_prob: float, final_kernel_sizes: list[int], sharpen_gt: bool, seed: int, rank: int = 0):
        """Args:
            scale: the SR factor: lq is gt's size // scale.
            first, second: the settings of each order (DegradationOrderSection or its fields as a dict).
            final_sinc_prob: probability of the final sinc filter per image.
            final_kernel_sizes: odd sizes of the final sinc kernel.
            sharpen_gt: degrade the USM-sharpened GT, as Real-ESRGAN (its `gt_usm`).
            seed, rank: the random streams are a function of both; workers draw different degradations.

        Raises:
            pydantic.ValidationError: an order's settings are out of bounds (naming the field).
        """
        self.scale = scale
        self.first = DegradationOrderSection.model_validate(first)
        self.second = DegradationOrderSection.model_validate(second)
        BlindDegradationSection(first=self.first, second=self.second, final_sinc_prob=final_sinc_prob,
                                final_kernel_sizes=final_kernel_sizes, sharpen_gt=sharpen_gt)  # validates
        self.final_sinc_prob, self.final_kernel_sizes = final_sinc_prob, list(final_kernel_sizes)
        self.sharpen_gt = sharpen_gt
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator().manual_seed(_mix_seed(seed, rank, _STREAM, 1))
        self._noise_generator: torch.Generator | None = None  # on the first batch's device
        self._noise_state: tuple[str, torch.Tensor] | None = None  # a loaded state, set on the next call
        self.calls = 0

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor) -> torch.Tensor:
        """The LR inputs of a batch.

        Args:
            gt: float (B, 3, H, W) in [0, 1], H and W divisible by scale, on any device.

        Returns:
            float32 (B, 3, H / scale, W / scale) in [0, 1], on 8-bit levels, on gt's device.
        """
        if gt.dim() != 4 or gt.shape[1] != 3 or gt.shape[-1] % self.scale or gt.shape[-2] % self.scale:
            raise ValueError(f"SecondOrderDegradation: expected gt (B, 3, H, W) with H, W divisible by "
                             f"{self.scale}, got {tuple(gt.shape)}")
        noise_generator = self._device_generator(gt.device)
        n, (height, width) = gt.shape[0], gt.shape[-2:]
        device = gt.device
        kernels = [draw_blur_kernels(n, self.generator, **order.kernel_kwargs())[0].float().to(device)
                   for order in (self.first, self.second)]
        sinc = draw_final_sinc_kernels(n, self.generator, kernel_sizes=self.final_kernel_sizes,
                                       prob=self.final_sinc_prob)[0].float().to(device)
        out = usm_sharpen(gt.float()) if self.sharpen_gt else gt.float()
        for index, (order, order_kernels) in enumerate(zip((self.first, self.second), kernels)):
            if self._uniform() < order.blur_prob:
                out = filter2d(out, order_kernels)
            factor, mode = self._resize_choice(order)
            if index == 0 and min(out.shape[-2:]) * factor >= 1:  # Real-ESRGAN: relative to the current size
                out = F.interpolate(out, scale_factor=factor, mode=mode)
            elif index == 0:  # a tiny patch would shrink below one pixel
                size = (max(1, math.floor(out.shape[-2] * factor)), max(1, math.floor(out.shape[-1] * factor)))
                out = F.interpolate(out, size=size, mode=mode)
            else:  # Real-ESRGAN: relative to the final LR size
                size = (max(1, int(height / self.scale * factor)), max(1, int(width / self.scale * factor)))
                out = F.interpolate(out, size=size, mode=mode)
            out = self._noise(out, order, noise_generator)
            out = jpeg_round_trip(out.clamp(0.0, 1.0), self._per_image(n, order.jpeg_range, device))
        lq_size = (height // self.scale, width // self.scale)
        resize_first, mode = self._uniform() < 0.5, RESIZE_MODES[self._choice(len(RESIZE_MODES))]
        quality = self._per_image(n, self.second.jpeg_range, device)
        if resize_first:
            out = filter2d(F.interpolate(out, size=lq_size, mode=mode), sinc)
            out = jpeg_round_trip(out.clamp(0.0, 1.0), quality)
        else:
            out = jpeg_round_trip(out.clamp(0.0, 1.0), quality)
            out = filter2d(F.interpolate(out, size=lq_size, mode=mode), sinc)
        self.calls += 1
        return (out * 255.0).round().clamp(0, 255) / 255.0

    def state_dict(self) -> dict[str, Any]:
        """Both generators' states (the device one as of the last batch) and the batch count."""
        noise = self._noise_state
        if self._noise_generator is not None:
            noise = (self._noise_generator.device.type, self._noise_generator.get_state())
        return {"generator": self.generator.get_state(), "noise": noise, "calls": self.calls,
                "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict(); the device generator is restored at the next batch.

        Raises:
            ValueError: the state is for another seed or rank.
        """
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(f"degradation state is for seed {state['seed']}, rank {state['rank']}; "
                             f"this one has seed {self.seed}, rank {self.rank}")
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])
        self._noise_generator, self._noise_state = None, state["noise"]

    # -- draws ---------------------------------------------------------------------------------------

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if self._noise_generator is not None and self._noise_generator.device.type == device.type:
            return self._noise_generator
        generator = torch.Generator(device=device).manual_seed(_mix_seed(self.seed, self.rank, _STREAM, 2))
        if self._noise_state is not None:
            saved_type, saved = self._noise_state
            if saved_type == device.type:
                generator.set_state(saved)
            else:  # a CUDA generator's state does not fit a CPU one: a fresh stream, said out loud
                generator.manual_seed(_mix_seed(self.seed, self.rank, _STREAM, 2, self.calls))
                warnings.warn(f"degradation noise was drawn on {saved_type} and continues on {device.type}: "
                              "the resumed noise differs from an uninterrupted run", stacklevel=3)
            self._noise_state = None
        self._noise_generator = generator
        return generator

    def _uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def _choice(self, count: int, weights: tuple[float, ...] | None = None) -> int:
        if weights is None:
            return int(torch.randint(count, (), generator=self.generator))
        return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=self.generator))

    def _per_image(self, n: int, bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
        low, high = bounds
        return (low + (high - low) * torch.rand(n, generator=self.generator, dtype=torch.float64)).float().to(device)

    def _resize_choice(self, order: DegradationOrderSection) -> tuple[float, str]:
        """Real-ESRGAN's up / down / keep with resize_probs, the factor uniform in [1, high] or [low, 1]."""
        direction, uniform = self._choice(3, tuple(order.resize_probs)), self._uniform()
        low, high = order.resize_range
        factor = (1 + (high - 1) * uniform, low + (1 - low) * uniform, 1.0)[direction]
        return factor, RESIZE_MODES[self._choice(len(RESIZE_MODES))]

    def _noise(self, img: torch.Tensor, order: DegradationOrderSection, generator: torch.Generator) -> torch.Tensor:
        """Gaussian (sigma on the 0-255 scale) or Poisson noise for the whole batch, its level and colour or
        gray per image; clipped to [0, 1]. Colour and gray noise are both drawn, then mixed per image."""
        n, device = img.shape[0], img.device
        gaussian = self._uniform() < order.gaussian_noise_prob
        level = self._per_image(n, order.noise_range if gaussian else order.poisson_scale_range, device)
        gray = (self._per_image(n, (0.0, 1.0), device) < order.gray_noise_prob).float().view(n, 1, 1, 1)
        level = level.view(n, 1, 1, 1)
        if gaussian:
            colour = torch.randn(img.shape, generator=generator, device=device, dtype=img.dtype)
            mono = torch.randn((n, 1, *img.shape[-2:]), generator=generator, device=device, dtype=img.dtype)
            noise = (colour * (1 - gray) + mono * gray) * level / 255.0
        else:
            colour = _poisson_noise(img, generator)
            mono = _poisson_noise(TF.rgb_to_grayscale(img, num_output_channels=1), generator)
            noise = (colour * (1 - gray) + mono * gray) * level
        return (img + noise).clamp(0.0, 1.0)


class PairPool:
    """Real-ESRGAN's training-pair pool (its queue): mixes (lq, gt) pairs across batches.

    While the pool fills, each batch passes through and is copied in. Once full, every batch shuffles
    the pool, takes out its first batch_size pairs and puts the new batch in their place, so a batch
    holds pairs degraded with different batch-level choices (resize, noise type).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0):
        """Raises:
            ValueError: size is not a positive multiple of batch_size.
        """
        if size <= 0 or batch_size <= 0 or size % batch_size:
            raise ValueError(f"pool size {size} must be a positive multiple of the batch size {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator().manual_seed(_mix_seed(seed, rank, _STREAM, 3))
        self.lq: torch.Tensor | None = None  # (size, 3, h, w)
        self.gt: torch.Tensor | None = None  # (size, 3, H, W)
        self.filled = 0

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on: (lq, gt) itself while the pool fills, then batch_size pairs from the pool."""
        if lq.shape[0] != self.batch_size or gt.shape[0] != self.batch_size:
            raise ValueError(f"PairPool: expected batches of {self.batch_size}, got {lq.shape[0]} / {gt.shape[0]}")
        if self.lq is None:
            self.lq = lq.new_zeros((self.size, *lq.shape[1:]))
            self.gt = gt.new_zeros((self.size, *gt.shape[1:]))
        elif self.lq.device != lq.device:
            self.lq, self.gt = self.lq.to(lq.device), self.gt.to(gt.device)
        if self.lq.shape[1:] != lq.shape[1:] or self.gt.shape[1:] != gt.shape[1:]:
            raise ValueError(f"PairPool: batch shapes {tuple(lq.shape[1:])} / {tuple(gt.shape[1:])} differ from "
                             f"the pool's {tuple(self.lq.shape[1:])} / {tuple(self.gt.shape[1:])}")
        b = self.batch_size
        if self.filled < self.size:
            self.lq[self.filled : self.filled + b] = lq
            self.gt[self.filled : self.filled + b] = gt
            self.filled += b
            return lq, gt
        order = torch.randperm(self.size, generator=self.generator).to(lq.device)
        self.lq, self.gt = self.lq[order], self.gt[order]
        taken = self.lq[:b].clone(), self.gt[:b].clone()
        self.lq[:b], self.gt[:b] = lq, gt
        return taken

    def state_dict(self) -> dict[str, Any]:
        """The pool's pairs (on the CPU), its fill level and its generator."""
        return {"filled": self.filled, "generator": self.generator.get_state(), "size": self.size,
                "lq": None if self.lq is None else self.lq.cpu(), "gt": None if self.gt is None else self.gt.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict(); the pairs move to the device at the next batch.

        Raises:
            ValueError: the state is for a pool of another size.
        """
        if state["size"] != self.size:
            raise ValueError(f"pool state is for {state['size']} pairs, this pool holds {self.size}")
        self.filled = int(state["filled"])
        self.generator.set_state(state["generator"])
        self.lq, self.gt = state["lq"], state["gt"]


class BlindPairs:
    """The device-side stage of blind training: (lq, gt) pairs from GT batches, through the pool."""

    def __init__(self, degradation: SecondOrderDegradation, pool: PairPool | None = None):
        self.degradation, self.pool = degradation, pool

    @classmethod
    def from_section(cls, section: BlindDegradationSection, *, scale: int, batch_size: int, seed: int,
                     rank: int = 0) -> BlindPairs:
        """The stage a `data.blind` config section describes (no pool when pool_size is 0)."""
        degradation = SecondOrderDegradation(scale=scale, seed=seed, rank=rank, **section.degradation_kwargs())
        pool = PairPool(section.pool_size, batch_size, seed=seed, rank=rank) if section.pool_size else None
        return cls(degradation, pool)

    def __call__(self, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lq (B, 3, H/s, W/s), gt (B, 3, H, W)) on gt's device."""
        lq = self.degradation(gt)
        return self.pool(lq, gt) if self.pool is not None else (lq, gt)

    def state_dict(self) -> dict[str, Any]:
        return {"degradation": self.degradation.state_dict(),
                "pool": self.pool.state_dict() if self.pool is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.degradation.load_state_dict(state["degradation"])
        if self.pool is not None and state["pool"] is not None:
            self.pool.load_state_dict(state["pool"])


def _mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)
