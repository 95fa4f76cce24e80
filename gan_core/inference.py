"""Inference on whole images of any size: overlapping tiles keep memory bounded.

Each tile is run with `tile_overlap` pixels of real context on every side and only its centre is
kept, so seams do not show (the Real-ESRGAN scheme). With an overlap at least as large as the
generator's receptive radius (about 18 LR pixels for `rrdb_tiny`, far more for ESRGAN's 23 blocks)
the result equals a whole-image pass up to float rounding; smaller overlaps trade exactness for
less recomputation.

Generators that pixel-unshuffle their input (RRDBNet at scale 2 and 1) need H and W divisible by
2 or 4: the whole image is padded once (reflect) to that multiple and the tile grid is aligned
to it, so no tile ever needs padding of its own.

Memory. A tiled `enhance_image` never holds the image's float32 output (12 * scale**2 bytes per
input pixel, 192 at x4, and as much again while rounding it): each tile's centre is rounded to
uint8 as soon as it is computed (`to_uint8`, BasicSR's tensor2img; rounding is per pixel, so
doing it tile by tile changes nothing) and copied into place. It holds the uint8 input, the
uint8 output (3 * scale**2 bytes per input pixel) and one tile's activations. `enhance_bands`
hands the output out one band of tile rows at a time, so a caller that writes the bands as they
come (`gan_core.data.images.PngWriter`) holds one band, not the output. `enhance_tensor` returns
the float output of the whole batch by definition: it is for float pipelines and tests, not
for large images. Without `tile` the whole image is one pass and the generator's activations
(num_feat floats per pixel, at every resolution it works at) dwarf everything else.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan_core.data.images import check_pixel_limit
from gan_core.scoring import to_uint8

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


def _pad_image_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """_pad_to_multiple for a uint8 HxWx3 array: numpy's reflect and edge modes are torch's reflect and
    replicate, and padding copies values, so the padded pixels are the same."""
    h, w = img.shape[:2]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not (pad_h or pad_w):
        return img
    mode = "reflect" if pad_h < h and pad_w < w else "edge"
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def _run(generator: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return generator(x).float()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_tile_settings(tile: int | None, tile_overlap: int) -> None:
    if tile is not None and (tile < MIN_TILE or tile_overlap < 0):
        raise ValueError(f"tile must be >= {MIN_TILE} and tile_overlap >= 0, got {tile} and {tile_overlap}")


def _tile_rows(height: int, width: int, tile: int, overlap: int) -> Iterator[list[tuple[slice, slice, slice, slice]]]:
    """The tile grid of a (height, width) input, one list per row of tiles, top to bottom.

    Each tile is (rows, cols, context_rows, context_cols) in input pixels: the part it produces
    and the larger part run through the generator for it (`overlap` more on each side, clipped).
    """
    for top in range(0, height, tile):
        bottom = min(top + tile, height)
        row = []
        for left in range(0, width, tile):
            right = min(left + tile, width)
            row.append((slice(top, bottom), slice(left, right),
                        slice(max(top - overlap, 0), min(bottom + overlap, height)),
                        slice(max(left - overlap, 0), min(right + overlap, width))))
        yield row


def _centre(piece: torch.Tensor, rows: slice, cols: slice, ctx_rows: slice, ctx_cols: slice,
            scale: int) -> torch.Tensor:
    """The part of a tile's output (N, C, ctx_h * scale, ctx_w * scale) that `rows` x `cols` produce."""
    y0, x0 = (rows.start - ctx_rows.start) * scale, (cols.start - ctx_cols.start) * scale
    return piece[..., y0 : y0 + (rows.stop - rows.start) * scale, x0 : x0 + (cols.stop - cols.start) * scale]


@torch.no_grad()
def enhance_tensor(
    generator: nn.Module, x: torch.Tensor, scale: int, *, tile: int | None = None, tile_overlap: int = 16,
    bf16: bool = False,
) -> torch.Tensor:
    """Run `generator` on (N, C, H, W) floats in [0, 1], tiled when `tile` is set and smaller than the image.

    The float output of the whole batch is allocated (12 * scale**2 bytes per input pixel); for
    large images use `enhance_image` or `enhance_bands`, which keep uint8.

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
    _check_tile_settings(tile, tile_overlap)
    multiple = input_multiple(scale)
    h, w = x.shape[-2:]
    padded = _pad_to_multiple(x, multiple)
    ph, pw = padded.shape[-2:]
    if tile is None or (ph <= tile and pw <= tile):
        return _run(generator, padded, bf16)[..., : h * scale, : w * scale]
    # Grid and context aligned to the multiple: every piece cut below is divisible by it.
    tile, tile_overlap = _round_up(tile, multiple), _round_up(tile_overlap, multiple)
    out = x.new_zeros(x.shape[0], x.shape[1], ph * scale, pw * scale, dtype=torch.float32)
    for row in _tile_rows(ph, pw, tile, tile_overlap):
        for rows, cols, ctx_rows, ctx_cols in row:
            piece = _run(generator, padded[..., ctx_rows, ctx_cols], bf16)
            out[..., rows.start * scale : rows.stop * scale, cols.start * scale : cols.stop * scale] = _centre(
                piece, rows, cols, ctx_rows, ctx_cols, scale)
    return out[..., : h * scale, : w * scale]


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> (1, 3, H, W) float in [0, 1].

    Raises:
        ValueError: the image is not uint8 HxWx3.
    """
    _check_rgb8(img)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div_(255.0)


def _check_rgb8(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        described = f"dtype {img.dtype} and shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {described}")


def _check_image_and_settings(img: np.ndarray, tile: int | None, tile_overlap: int, max_pixels: int | None) -> None:
    _check_rgb8(img)
    check_pixel_limit("image", img.shape[1], img.shape[0], max_pixels)
    _check_tile_settings(tile, tile_overlap)


def enhance_bands(
    generator: nn.Module, img: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    tile: int | None = None, tile_overlap: int = 16, bf16: bool = False, max_pixels: int | None = None,
) -> Iterator[np.ndarray]:
    """Enhance one uint8 HxWx3 RGB image and yield the result as bands of rows, top to bottom.

    Each band is the output of one row of tiles: uint8 (tile * scale, W * scale, 3), the last one
    shorter; without tiling, one band holds the whole image. The bands stacked are exactly what
    `enhance_image` returns. Arguments are checked before the first band is computed.

    Args:
        generator, img, scale, device, tile, tile_overlap, bf16, max_pixels: as in `enhance_image`.

    Yields:
        uint8 (rows, W * scale, 3) arrays, rounded as BasicSR's tensor2img.

    Raises:
        ValueError: the image is not uint8 HxWx3, or bad tile settings.
        ImageTooLargeError: the image has more than max_pixels pixels.
    """
    _check_image_and_settings(img, tile, tile_overlap, max_pixels)
    return _bands(generator, img, scale, torch.device(device), tile, tile_overlap, bf16)


@torch.no_grad()  # on the generator function itself: it holds on every resume, not only at creation
def _bands(generator: nn.Module, img: np.ndarray, scale: int, device: torch.device, tile: int | None,
           tile_overlap: int, bf16: bool, out: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """enhance_bands without the checks. With `out` (uint8 (H*scale, W*scale, 3)), tiled bands are
    views into it, filled in place, instead of new arrays."""
    multiple = input_multiple(scale)
    h, w = img.shape[:2]
    ph, pw = _round_up(h, multiple), _round_up(w, multiple)
    if tile is None or (ph <= tile and pw <= tile):
        whole = to_uint8(enhance_tensor(generator, image_to_tensor(img).to(device), scale, bf16=bf16))
        if out is not None:
            out[...] = whole
        yield whole
        return
    padded = _pad_image_to_multiple(img, multiple)  # uint8: a tile is turned into floats only when it runs
    tile, tile_overlap = _round_up(tile, multiple), _round_up(tile_overlap, multiple)
    for row in _tile_rows(ph, pw, tile, tile_overlap):
        band_top = row[0][0].start * scale
        band_height = min(row[0][0].stop * scale, h * scale) - band_top  # padding below the image is cut off
        if out is None:
            band = np.empty((band_height, w * scale, 3), np.uint8)
        else:
            band = out[band_top : band_top + band_height]
        for rows, cols, ctx_rows, ctx_cols in row:
            piece = _run(generator, image_to_tensor(padded[ctx_rows, ctx_cols]).to(device), bf16)
            # to_uint8 rounds each pixel on its own, so rounding tile by tile equals rounding the whole.
            centre = to_uint8(_centre(piece, rows, cols, ctx_rows, ctx_cols, scale))
            left, right = cols.start * scale, min(cols.stop * scale, w * scale)
            band[:, left:right] = centre[:band_height, : right - left]
        yield band


@torch.no_grad()
def enhance_image(
    generator: nn.Module, img: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    tile: int | None = None, tile_overlap: int = 16, bf16: bool = False, max_pixels: int | None = None,
) -> np.ndarray:
    """Enhance one uint8 HxWx3 RGB image.

    Tiled, no float buffer of the whole output is allocated (see the module docstring).

    Args:
        generator: the model, in eval mode, on `device`.
        img: uint8 HxWx3 RGB.
        scale: the generator's upscaling factor.
        device: where to run.
        tile, tile_overlap, bf16: as in `enhance_tensor`.
        max_pixels: refuse images with more than this many pixels (H * W; None: no limit).

    Returns:
        uint8 (H*scale)x(W*scale)x3, rounded as BasicSR's tensor2img.

    Raises:
        ValueError: the image is not uint8 HxWx3, or bad tile settings.
        ImageTooLargeError: the image has more than max_pixels pixels.
    """
    _check_image_and_settings(img, tile, tile_overlap, max_pixels)
    out = np.empty((img.shape[0] * scale, img.shape[1] * scale, 3), np.uint8)
    for _ in _bands(generator, img, scale, torch.device(device), tile, tile_overlap, bf16, out=out):
        pass  # each band is written into `out` in place
    return out
