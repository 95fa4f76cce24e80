"""Inference on whole images of any size: overlapping tiles keep memory bounded.

Each tile is run with `tile_overlap` pixels of real context on every side and only its centre is
kept, so seams do not show (the Real-ESRGAN scheme). With an overlap at least as large as the
generator's receptive radius (about 18 LR pixels for `rrdb_tiny`, far more for ESRGAN's 23 blocks)
the result equals a whole-image pass up to float rounding; smaller overlaps trade exactness for
less recomputation.

Generators that pixel-unshuffle their input (RRDBNet at scale 2 and 1) need H and W divisible by
2 or 4: the whole image is padded once (reflect) to that multiple and the tile grid is aligned
to it, so no tile ever needs padding of its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan_core.evaluation import to_uint8

MIN_TILE = 8


def input_multiple(scale: int) -> int:
    """The side multiple RRDBNet needs at `scale` (it pixel-unshuffles by 2 at scale 2, by 4 at scale 1)."""
    return {1: 4, 2: 2}.get(scale, 1)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not (pad_h or pad_w):
        return x
    # reflect needs the pad smaller than the side; a 1-3 px wide image falls back to replicate.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _run(generator: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return generator(x).float()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@torch.no_grad()
def enhance_tensor(
    generator: nn.Module, x: torch.Tensor, scale: int, *, tile: int | None = None, tile_overlap: int = 16,
    bf16: bool = False,
) -> torch.Tensor:
    """Run `generator` on (N, C, H, W) floats in [0, 1], tiled when `tile` is set and smaller than the image.

    Args:
        generator: the model, in eval mode, on x's device.
        x: (N, C, H, W) input.
        scale: the generator's upscaling factor.
        tile: the LR side of one tile (None: the whole image in one pass). Rounded up to the
            generator's input multiple.
        tile_overlap: LR pixels of context run on each side of a tile and then discarded.
        bf16: run under bf16 autocast.

    Returns:
        (N, C, H*scale, W*scale) floats (not clamped).

    Raises:
        ValueError: `tile` < 8 or `tile_overlap` < 0.
    """
    if tile is not None and (tile < MIN_TILE or tile_overlap < 0):
        raise ValueError(f"tile must be >= {MIN_TILE} and tile_overlap >= 0, got {tile} and {tile_overlap}")
    multiple = input_multiple(scale)
    h, w = x.shape[-2:]
    padded = _pad_to_multiple(x, multiple)
    ph, pw = padded.shape[-2:]
    if tile is None or (ph <= tile and pw <= tile):
        return _run(generator, padded, bf16)[..., : h * scale, : w * scale]
    # Grid and context aligned to the multiple: every piece cut below is divisible by it.
    tile, tile_overlap = _round_up(tile, multiple), _round_up(tile_overlap, multiple)
    out = x.new_zeros(x.shape[0], x.shape[1], ph * scale, pw * scale, dtype=torch.float32)
    for top in range(0, ph, tile):
        for left in range(0, pw, tile):
            bottom, right = min(top + tile, ph), min(left + tile, pw)
            ctx_top, ctx_left = max(top - tile_overlap, 0), max(left - tile_overlap, 0)
            ctx_bottom, ctx_right = min(bottom + tile_overlap, ph), min(right + tile_overlap, pw)
            piece = _run(generator, padded[..., ctx_top:ctx_bottom, ctx_left:ctx_right], bf16)
            y0, x0 = (top - ctx_top) * scale, (left - ctx_left) * scale
            out[..., top * scale : bottom * scale, left * scale : right * scale] = piece[
                ..., y0 : y0 + (bottom - top) * scale, x0 : x0 + (right - left) * scale
            ]
    return out[..., : h * scale, : w * scale]


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> (1, 3, H, W) float in [0, 1].

    Raises:
        ValueError: the image is not uint8 HxWx3.
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        described = f"dtype {img.dtype} and shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {described}")
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div_(255.0)


@torch.no_grad()
def enhance_image(
    generator: nn.Module, img: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    tile: int | None = None, tile_overlap: int = 16, bf16: bool = False,
) -> np.ndarray:
    """Enhance one uint8 HxWx3 RGB image.

    Args:
        generator: the model, in eval mode, on `device`.
        img: uint8 HxWx3 RGB.
        scale: the generator's upscaling factor.
        device: where to run.
        tile, tile_overlap, bf16: as in `enhance_tensor`.

    Returns:
        uint8 (H*scale)x(W*scale)x3, rounded as BasicSR's tensor2img.

    Raises:
        ValueError: the image is not uint8 HxWx3, or bad tile settings.
    """
    x = image_to_tensor(img).to(device)
    return to_uint8(enhance_tensor(generator, x, scale, tile=tile, tile_overlap=tile_overlap, bf16=bf16))
