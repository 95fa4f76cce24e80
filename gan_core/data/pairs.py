"""Training and validation (lq, gt) pairs made from high-resolution images.

Training follows BasicSR's paired-image recipe: every epoch visits each HR
(sub-)image once in a seeded random order and takes one random crop of it,
augmented with flips / 90-degree rotations; the LR patch is made from the crop
(bicubic by default, or the `degrade` pipeline). Validation uses the classic
benchmark LR: the mod-cropped HR image bicubic-downscaled with MATLAB's kernel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from gan_core.data.degradations import DEGRADATION_KEYS, bicubic_downscale, degrade, imresize


def random_patch_pair(
    hr: torch.Tensor,
    *,
    patch_size: int,
    scale: int,
    hflip: bool = True,
    rot90: bool = True,
    color_jitter: float = 0.0,
    degradation: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one augmented training pair out of an HR image.

    Args:
        hr: uint8 tensor (3, H, W) with H, W >= patch_size.
        patch_size: HR patch size, divisible by scale.
        scale: super-resolution factor.
        hflip: mirror left-right with probability 1/2.
        rot90: also mirror top-bottom and transpose, each with probability 1/2
            (with hflip: all 8 rotations/reflections, as BasicSR's augment).
        color_jitter: strength s of brightness, contrast and saturation jitter,
            each factor uniform in [1 - s, 1 + s]; 0 disables it.
        degradation: keyword arguments of degrade() (blur_sigma, noise_sigma,
            poisson_scale, jpeg_quality); None means plain bicubic downscaling.
        generator: torch.Generator (CPU) for every random draw.

    Returns:
        (lq, gt) float32 tensors in [0, 1]: (3, p / scale, p / scale) and (3, p, p).

    Raises:
        ValueError: sizes are inconsistent or the degradation has unknown keys.
    """
    _check_patch_args(patch_size, scale, degradation)
    gt = random_gt_patch(hr, patch_size=patch_size, scale=scale, hflip=hflip, rot90=rot90,
                         color_jitter=color_jitter, generator=generator)
    return make_lq(gt, scale, degradation, generator), gt


def random_gt_patch(
    hr: torch.Tensor,
    *,
    patch_size: int,
    scale: int,
    hflip: bool = True,
    rot90: bool = True,
    color_jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The HR half of random_patch_pair: crop, flips/rotations, colour jitter.

    The crop's corner lies on the scale grid (as BasicSR's paired_random_crop,
    which crops the LR image and multiplies by scale).

    Args:
        hr: uint8 (3, H, W), or (6, H, W) for a pair (input then target, gan_core.tasks): both halves get the
            same window and the same flips; colour jitter is for images only.

    Returns:
        float32 tensor (C, patch_size, patch_size) in [0, 1].

    Raises:
        ValueError: hr is not uint8 (3 or 6, H, W) or is smaller than patch_size.
    """
    if hr.dtype != torch.uint8 or hr.dim() != 3 or hr.shape[0] not in (3, 6):
        raise ValueError(f"expected a uint8 (3, H, W) image or (6, H, W) pair tensor, got {hr.dtype} {tuple(hr.shape)}")
    height, width = hr.shape[1:]
    if height < patch_size or width < patch_size:
        raise ValueError(f"image {height}x{width} is smaller than patch_size {patch_size}")
    lr_patch = patch_size // scale
    top = scale * int(torch.randint(0, (height // scale) - lr_patch + 1, (1,), generator=generator))
    left = scale * int(torch.randint(0, (width // scale) - lr_patch + 1, (1,), generator=generator))
    patch = hr[:, top : top + patch_size, left : left + patch_size]  # (3, p, p) uint8
    coins = torch.rand(3, generator=generator).tolist()
    if hflip and coins[0] < 0.5:
        patch = patch.flip(-1)
    if rot90 and coins[1] < 0.5:
        patch = patch.flip(-2)
    if rot90 and coins[2] < 0.5:
        patch = patch.transpose(-1, -2)
    gt = patch.float().div_(255.0)
    if color_jitter > 0 and gt.shape[0] == 3:
        gt = _color_jitter(gt, color_jitter, generator)
    return gt.contiguous()


def make_lq(gt: torch.Tensor, scale: int, degradation: dict | None, generator: torch.Generator | None) -> torch.Tensor:
    """LR input of a (batch of) gt patch(es): bicubic, or degrade(**degradation)."""
    if degradation is None:
        return bicubic_downscale(gt, scale)
    return degrade(gt, scale, generator=generator, **degradation)


class PatchSampler:
    """Endless, resumable stream of training batches from in-memory HR images.

    Each epoch is a seeded permutation of the usable images; each visit cuts one
    random patch (BasicSR: one random crop per sub-image per epoch). With
    `groups` (e.g. the source photo of each tile), an epoch instead draws as many
    visits as there are images, each group equally often and each image of a
    group equally often, so a photo cut into many tiles does not outweigh a small
    one. Batches run across image and epoch boundaries. Images smaller than patch_size are left
    out and their names listed in `skipped`. The LR half of a batch is computed
    on the whole batch at once.

    Randomness: the order of epoch e is a function of (seed, rank, e) only; the
    crops and augmentations come from one generator seeded with (seed, rank),
    whose state state_dict() saves, so a resumed sampler yields the same batches.

    Attributes:
        epoch: the epoch of the next image visit (starts at 0).
        position: index of the next visit within the epoch's order.
        skipped: names of the images left out as too small.
        names: names of the usable images.
    """

    def __init__(
        self,
        images: list,
        *,
        patch_size: int,
        scale: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        hflip: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.0,
        degradation: dict | None = None,
        names: list[str] | None = None,
        groups: list[str] | None = None,
        gt_only: bool = False,
        make_pair: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """Args:
            images: HR images, each a uint8 (H, W, 3) array, a uint8 (3, H, W)
                tensor, or a (name, image) pair as load_shard_images returns.
            patch_size, scale, hflip, rot90, color_jitter, degradation: as random_patch_pair.
            batch_size: patches per batch.
            seed: base seed.
            rank: this worker's rank, so workers draw different patches.
            names: names of the images (default "image-<index>"), for `skipped`.
            groups: one label per image (same order as images) to sample the labels
                uniformly instead of the images; None samples the images uniformly.
            gt_only: yield (None, gt) batches: the LR is made later, on the training device
                (blind degradation, gan_core.data.realesrgan); `degradation` must be None.
            make_pair: makes (lq, gt) of a batch of patches with the sampler's generator, instead of
                `degradation` (a task's `train_pair`, gan_core.tasks); images may then be pairs,
                uint8 (H, W, 6) arrays (input then target).

        Raises:
            ValueError: bad sizes, unknown degradation keys, or no image is large enough.
        """
        _check_patch_args(patch_size, scale, degradation)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if gt_only and degradation is not None:
            raise ValueError("gt_only makes no LR: degradation must be None")
        if make_pair is not None and degradation is not None:
            raise ValueError("give make_pair or degradation, not both")
        self.make_pair = make_pair
        if groups is not None and len(groups) != len(images):
            raise ValueError(f"groups has {len(groups)} labels for {len(images)} images")
        self.patch_size, self.scale, self.batch_size = patch_size, scale, batch_size
        self.hflip, self.rot90, self.color_jitter, self.degradation = hflip, rot90, color_jitter, degradation
        self.seed, self.rank, self.gt_only = seed, rank, gt_only
        self.images: list[torch.Tensor] = []
        self.names: list[str] = []
        self.skipped: list[str] = []
        kept_groups = []
        for index, item in enumerate(images):
            name, image = item if isinstance(item, tuple) else (names[index] if names else f"image-{index}", item)
            hr = to_chw_uint8(image, pairs=make_pair is not None)
            if min(hr.shape[1:]) < patch_size:
                self.skipped.append(name)
            else:
                self.images.append(hr)
                self.names.append(name)
                kept_groups.append(groups[index] if groups is not None else None)
        if not self.images:
            raise ValueError(
                f"PatchSampler: none of the {len(self.skipped)} images is at least {patch_size} px on its shorter side"
            )
        self.weights = None  # per-image visit probability when sampling by group
        if groups is not None:
            sizes = Counter(kept_groups)
            self.weights = torch.tensor([1.0 / (len(sizes) * sizes[group]) for group in kept_groups],
                                        dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(_mix_seed(seed, rank))
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def __iter__(self) -> "PatchSampler":
        return self

    def __next__(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The next batch: (lq (B, 3, p/s, p/s), gt (B, 3, p, p)), float32 in [0, 1]; lq is None with gt_only."""
        patches = []
        for _ in range(self.batch_size):
            hr = self.images[self._order[self.position]]
            patches.append(random_gt_patch(hr, patch_size=self.patch_size, scale=self.scale, hflip=self.hflip,
                                           rot90=self.rot90, color_jitter=self.color_jitter, generator=self.generator))
            self._advance()
        gt = torch.stack(patches)  # (B, 3, p, p)
        if self.gt_only:
            return None, gt
        if self.make_pair is not None:
            return self.make_pair(gt, self.generator)
        return make_lq(gt, self.scale, self.degradation, self.generator), gt

    def state_dict(self) -> dict:
        """Everything needed to resume: epoch, position, generator state, image count."""
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state(),
                "num_images": len(self.images)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(); the sampler must hold the same images.

        Raises:
            ValueError: the state was saved with a different number of images.
        """
        if state["num_images"] != len(self.images):
            raise ValueError(f"sampler state is for {state['num_images']} images, this sampler has {len(self.images)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])
        self._order = self._epoch_order(self.epoch)

    def _advance(self) -> None:
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order_generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.rank, epoch + 1))
        if self.weights is not None:
            return torch.multinomial(self.weights, len(self.images), replacement=True,
                                     generator=order_generator).tolist()
        return torch.randperm(len(self.images), generator=order_generator).tolist()


def validation_pair(hr, scale: int, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic benchmark pair: mod-crop, then MATLAB bicubic downscaling.

    Args:
        hr: uint8 (H, W, 3) array or uint8 (3, H, W) tensor.
        scale: super-resolution factor.
        quantize: round the LR image to 8 bits, as the benchmark LR files
            (generated by MATLAB and saved as PNG) are.

    Returns:
        (lq, gt) float32 tensors (1, 3, H', W') in [0, 1], gt mod-cropped to a
        multiple of scale and lq scale times smaller.

    Raises:
        ValueError: the image is smaller than scale.
    """
    chw = to_chw_uint8(hr)
    height, width = (chw.shape[1] // scale) * scale, (chw.shape[2] // scale) * scale
    if height == 0 or width == 0:
        raise ValueError(f"image {tuple(chw.shape[1:])} is smaller than scale {scale}")
    gt = chw[:, :height, :width].float().div_(255.0).unsqueeze(0)
    lq = bicubic_downscale(gt, scale)
    if quantize:
        lq = lq.mul_(255.0).round_().div_(255.0)
    return lq, gt


def bicubic_upscale(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: imresize(lq, scale), clamped to [0, 1].

    Args:
        lq: float tensor (C, H, W) or (N, C, H, W) in [0, 1].
        scale: upscaling factor.

    Returns:
        Float tensor scale times larger, in [0, 1].
    """
    return imresize(lq, scale).clamp_(0.0, 1.0)


def to_chw_uint8(image, pairs: bool = False) -> torch.Tensor:
    """uint8 (H, W, 3) array or uint8 (3, H, W) tensor -> contiguous uint8 (3, H, W) tensor; with `pairs`, also
    (H, W, 6) / (6, H, W) pairs (input then target, gan_core.tasks).

    Raises:
        ValueError: anything else.
    """
    channels = (3, 6) if pairs else (3,)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in channels:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # a writable copy
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] in channels:
        return image.contiguous()
    desc = f"{image.dtype} {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
    raise ValueError(f"expected a uint8 (H, W, 3) array or uint8 (3, H, W) tensor, got {desc}")


def _check_patch_args(patch_size: int, scale: int, degradation: dict | None) -> None:
    if scale < 1 or patch_size < scale or patch_size % scale:
        raise ValueError(f"patch_size ({patch_size}) must be a positive multiple of scale ({scale})")
    unknown = set(degradation or {}) - set(DEGRADATION_KEYS)
    if unknown:
        raise ValueError(f"unknown degradation keys {sorted(unknown)}; valid: {list(DEGRADATION_KEYS)}")


def _color_jitter(gt: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast, saturation factors each uniform in [1 - s, 1 + s]."""
    factors = (1 - strength + 2 * strength * torch.rand(3, generator=generator)).clamp(min=0).tolist()
    gt = TF.adjust_brightness(gt, factors[0])
    gt = TF.adjust_contrast(gt, factors[1])
    gt = TF.adjust_saturation(gt, factors[2])
    return gt.clamp_(0.0, 1.0)


def _mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, rank, epoch)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)
