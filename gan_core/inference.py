"""Inference on whole images of any size: overlapping tiles keep memory bounded.

Each tile is run with `tile_overlap` pixels of real context on every side and only its centre is
kept, so seams do not show (the Real-ESRGAN scheme). With an overlap at least as large as the
generator's receptive radius (about 18 LR pixels for `rrdb_tiny`, far more for ESRGAN's 23 blocks;
a BasicSR-layout x1 RRDB works at quarter resolution, so its radius in input pixels is about four times its
depth; one with `pixel_unshuffle=False` works on every pixel)
the result equals a whole-image pass up to float rounding; smaller overlaps trade exactness for
less recomputation.

Channels. The low-level functions (`enhance_tensor`, `enhance_image`, `enhance_bands`) take the
generator's input as it is: uint8 H x W x C, C = the generator's `num_in_ch`, and give its output:
uint8 H x W x 3 for RGB generators, H x W for one output channel. What a user has is an RGB image
(and, for fusion, an infrared one too); `model_input` turns that into the generator's input, and
`enhance` does the whole way, image in, image out:

    in -> out   task                    model_input(generator, image, ir)
    3 -> 3      sr, denoise, lowlight   the RGB image
    1 -> 1      gray denoise, lowlight  its full-range luma (gan_core.tasks.LUMA, as PIL's "L")
    2 -> 1      fusion                  (infrared gray level, visible luma), same size

    out = enhance(generator, rgb, generator.scale)                       # HxWx3, or HxW for gray models
    fused = enhance(fusion_generator, visible_rgb, 1, ir=infrared)       # in colour if the visible image is

A fusion generator outputs the fused luma. When the visible image has colour, `enhance` gives it back
in colour by default (`recolour`): the visible image's YCbCr (full-range BT.601, JPEG's and PIL's
"YCbCr") with Y replaced by the fused luma, converted back to RGB; `colour=False` keeps the gray
fused image. A gray visible image gives a gray (H x W) result.

Generators that pixel-unshuffle their input (RRDBNet at scale 2 and 1) need H and W divisible by
2 or 4: the whole image is padded once (reflect) to that multiple and the tile grid is aligned
to it, so no tile ever needs padding of its own (full-resolution trunks are padded the same way: harmless).

Memory. A tiled `enhance_image` never holds the image's float32 output (12 * scale**2 bytes per
input pixel, 192 at x4, and as much again while rounding it): each tile's centre is rounded to
uint8 as soon as it is computed (`to_uint8`, BasicSR's tensor2img; rounding is per pixel, so
doing it tile by tile changes nothing) and copied into place. It holds the uint8 input, the
uint8 output (3 * scale**2 bytes per input pixel for RGB, a third of that for gray) and one tile's
activations. `enhance_bands` hands the output out one band of tile rows at a time, so a caller that
writes the bands as they come (`gan_core.data.images.PngWriter`) holds one band, not the output. `enhance_tensor` returns
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
from gan_core.tasks import to_uint8
from gan_core.user_images import (  # noqa: F401 (re-exported: logged pyfunc models import them from here)
    _as_hwc,
    _check_user_image,
    _describe_array,
    generator_channels,
    infrared_gray,
    is_gray,
    luma_image,
    model_input,
    recolour,
    recolour_bands,
    wants_colour,
)

MIN_TILE = 8
GPU_TILE_BATCH = 8  # tiles per forward pass on a GPU (it wants whole batches); on a CPU one at a time is faster


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
    """_pad_to_multiple for a uint8 HxWxC array: numpy's reflect and edge modes are torch's reflect and
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


def _run_tiles(generator: nn.Module, pieces: list[torch.Tensor], bf16: bool, tile_batch: int) -> list[torch.Tensor]:
    """The generator's output for each piece (N, C, h, w): pieces of one shape run as one batch, `tile_batch`
    of them at a time (a GPU is fed whole batches; edge tiles, clipped to the image, form their own)."""
    outputs: list[torch.Tensor] = [None] * len(pieces)  # type: ignore[list-item]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, piece in enumerate(pieces):
        by_shape.setdefault(tuple(piece.shape), []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), tile_batch):
            chunk = indices[start : start + tile_batch]
            result = _run(generator, torch.cat([pieces[i] for i in chunk]), bf16)
            for index, output in zip(chunk, result.split(pieces[chunk[0]].shape[0])):
                outputs[index] = output
    return outputs


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_tile_settings(tile: int | None, tile_overlap: int, tile_batch: int = 1) -> None:
    if tile is not None and (tile < MIN_TILE or tile_overlap < 0):
        raise ValueError(f"tile must be >= {MIN_TILE} and tile_overlap >= 0, got {tile} and {tile_overlap}")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")


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
    bf16: bool = False, tile_batch: int = 1,
) -> torch.Tensor:
    """Run `generator` on (N, C, H, W) floats in [0, 1], tiled when `tile` is set and smaller than the image.

    The float output of the whole batch is allocated (12 * scale**2 bytes per input pixel); for
    large images use `enhance_image` or `enhance_bands`, which keep uint8.

    Args:
        generator: the model, in eval mode, on x's device.
        x: (N, C, H, W) input, C the generator's input channels.
        scale: the generator's upscaling factor.
        tile: the LR side of one tile (None: the whole image in one pass). Rounded up to the
            generator's input multiple.
        tile_overlap: LR pixels of context run on each side of a tile and then discarded.
        bf16: run under bf16 autocast.
        tile_batch: tiles of a row of tiles run together, at most this many per forward pass (a GPU wants
            whole batches; memory grows with it).

    Returns:
        (N, C_out, H*scale, W*scale) floats (not clamped), C_out the generator's output channels.

    Raises:
        ValueError: `tile` < 8, `tile_overlap` < 0 or `tile_batch` < 1.
    """
    _check_tile_settings(tile, tile_overlap, tile_batch)
    multiple = input_multiple(scale)
    h, w = x.shape[-2:]
    padded = _pad_to_multiple(x, multiple)
    ph, pw = padded.shape[-2:]
    if tile is None or (ph <= tile and pw <= tile):
        return _run(generator, padded, bf16)[..., : h * scale, : w * scale]
    # Grid and context aligned to the multiple: every piece cut below is divisible by it.
    tile, tile_overlap = _round_up(tile, multiple), _round_up(tile_overlap, multiple)
    out = None  # allocated at the first tile: the generator's output channels need not be the input's
    for row in _tile_rows(ph, pw, tile, tile_overlap):
        pieces = _run_tiles(generator, [padded[..., ctx_rows, ctx_cols] for _, _, ctx_rows, ctx_cols in row], bf16,
                            tile_batch)
        for (rows, cols, ctx_rows, ctx_cols), piece in zip(row, pieces):
            if out is None:
                out = x.new_zeros(x.shape[0], piece.shape[1], ph * scale, pw * scale, dtype=torch.float32)
            out[..., rows.start * scale : rows.stop * scale, cols.start * scale : cols.stop * scale] = _centre(
                piece, rows, cols, ctx_rows, ctx_cols, scale)
    return out[..., : h * scale, : w * scale]


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWxC (or HxW, one channel) -> (1, C, H, W) float in [0, 1].

    Raises:
        ValueError: the image is not uint8 HxW or HxWxC.
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 HxWx3 RGB image (or HxWxC, HxW), got {_describe_array(img)}")
    chw = torch.from_numpy(np.ascontiguousarray(_as_hwc(img))).permute(2, 0, 1)
    return chw[None].float().div_(255.0)


_INPUT_FORMS = {
    3: "a uint8 HxWx3 RGB image",
    1: "a uint8 HxW (or HxWx1) gray image for a 1-channel generator (model_input makes it from RGB)",
    2: "a uint8 HxWx2 image (infrared, visible luma) for a 2-channel fusion generator (model_input makes it)",
}


def _check_generator_input(img: np.ndarray, channels: int) -> None:
    """The input a generator of `channels` input channels takes: uint8 HxWxC (HxW also for C = 1)."""
    ok = isinstance(img, np.ndarray) and img.dtype == np.uint8 and (
        (img.ndim == 3 and img.shape[2] == channels) or (img.ndim == 2 and channels == 1))
    if not ok:
        form = _INPUT_FORMS.get(channels, f"a uint8 HxWx{channels} image")
        raise ValueError(f"expected {form}, got {_describe_array(img)}")


def _check_image_and_settings(img: np.ndarray, channels: int, tile: int | None, tile_overlap: int,
                              max_pixels: int | None, tile_batch: int = 1) -> None:
    _check_generator_input(img, channels)
    check_pixel_limit("image", img.shape[1], img.shape[0], max_pixels)
    _check_tile_settings(tile, tile_overlap, tile_batch)


def enhance_bands(
    generator: nn.Module, img: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    tile: int | None = None, tile_overlap: int = 16, bf16: bool = False, max_pixels: int | None = None,
    tile_batch: int = 1,
) -> Iterator[np.ndarray]:
    """Enhance one image (the generator's input, see `enhance_image`) and yield the result as bands of rows,
    top to bottom.

    Each band is the output of one row of tiles: uint8 (tile * scale, W * scale, 3), or
    (tile * scale, W * scale) for a 1-channel generator, the last one shorter; without tiling, one band
    holds the whole image. The bands stacked are exactly what
    `enhance_image` returns. Arguments are checked before the first band is computed.

    Args:
        generator, img, scale, device, tile, tile_overlap, bf16, max_pixels, tile_batch: as in `enhance_image`.

    Yields:
        uint8 (rows, W * scale, 3) arrays ((rows, W * scale) for one output channel), rounded as BasicSR's
        tensor2img.

    Raises:
        ValueError: the image is not what the generator takes (see `enhance_image`), or bad tile settings.
        ImageTooLargeError: the image has more than max_pixels pixels.
    """
    _check_image_and_settings(img, generator_channels(generator)[0], tile, tile_overlap, max_pixels, tile_batch)
    return _bands(generator, _as_hwc(img), scale, torch.device(device), tile, tile_overlap, bf16, tile_batch=tile_batch)


@torch.no_grad()  # on the generator function itself: it holds on every resume, not only at creation
def _bands(generator: nn.Module, img: np.ndarray, scale: int, device: torch.device, tile: int | None,
           tile_overlap: int, bf16: bool, out: np.ndarray | None = None, tile_batch: int = 1,
           ) -> Iterator[np.ndarray]:
    """enhance_bands without the checks, on a uint8 HxWxC input. With `out` (uint8 (H*scale, W*scale, 3), or
    (H*scale, W*scale) for one output channel), tiled bands are views into it, filled in place, instead of new
    arrays."""
    channels_out = generator_channels(generator)[1]
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
            band = np.empty(_output_shape(band_height, w * scale, channels_out), np.uint8)
        else:
            band = out[band_top : band_top + band_height]
        pieces = _run_tiles(generator, [image_to_tensor(padded[ctx_rows, ctx_cols]).to(device)
                                        for _, _, ctx_rows, ctx_cols in row], bf16, tile_batch)
        for (rows, cols, ctx_rows, ctx_cols), piece in zip(row, pieces):
            # to_uint8 rounds each pixel on its own, so rounding tile by tile equals rounding the whole.
            centre = to_uint8(_centre(piece, rows, cols, ctx_rows, ctx_cols, scale))
            left, right = cols.start * scale, min(cols.stop * scale, w * scale)
            band[:, left:right] = centre[:band_height, : right - left]
        yield band


def _output_shape(height: int, width: int, channels: int) -> tuple[int, ...]:
    """What to_uint8 gives for a (1, channels, height, width) output: H x W for one channel, else H x W x C."""
    return (height, width) if channels == 1 else (height, width, channels)


@torch.no_grad()
def enhance_image(
    generator: nn.Module, img: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    tile: int | None = None, tile_overlap: int = 16, bf16: bool = False, max_pixels: int | None = None,
    tile_batch: int = 1,
) -> np.ndarray:
    """Enhance one image: the generator's input as it is (`model_input` makes it from what a user has).

    Tiled, no float buffer of the whole output is allocated (see the module docstring).

    Args:
        generator: the model, in eval mode, on `device`.
        img: uint8 HxWx3 RGB for an RGB generator; HxW (or HxWx1) for a 1-channel one; HxWx2 (infrared,
            visible luma) for a fusion generator.
        scale: the generator's upscaling factor.
        device: where to run.
        tile, tile_overlap, bf16, tile_batch: as in `enhance_tensor`.
        max_pixels: refuse images with more than this many pixels (H * W; None: no limit).

    Returns:
        uint8 (H*scale)x(W*scale)x3, or (H*scale)x(W*scale) for a 1-channel output, rounded as BasicSR's
        tensor2img.

    Raises:
        ValueError: the image is not what the generator takes, or bad tile settings.
        ImageTooLargeError: the image has more than max_pixels pixels.
    """
    _check_image_and_settings(img, generator_channels(generator)[0], tile, tile_overlap, max_pixels, tile_batch)
    shape = _output_shape(img.shape[0] * scale, img.shape[1] * scale, generator_channels(generator)[1])
    out = np.empty(shape, np.uint8)
    for _ in _bands(generator, _as_hwc(img), scale, torch.device(device), tile, tile_overlap, bf16, out=out,
                    tile_batch=tile_batch):
        pass  # each band is written into `out` in place
    return out


def enhance(
    generator: nn.Module, image: np.ndarray, scale: int, device: torch.device | str = "cpu", *,
    ir: np.ndarray | None = None, colour: bool | None = None, tile: int | None = None, tile_overlap: int = 16,
    bf16: bool = False, max_pixels: int | None = None, tile_batch: int = 1,
) -> np.ndarray:
    """Enhance what a user has: `model_input`, `enhance_image`, and for fusion `recolour` when asked.

    Args:
        generator, scale, device, tile, tile_overlap, bf16, max_pixels, tile_batch: as `enhance_image`.
        image: uint8 HxWx3 RGB (or HxW gray); for fusion the visible image.
        ir: fusion only: the infrared image (see `model_input`).
        colour: fusion only: True, the fused luma in the visible image's colour; False, gray; None (default):
            colour when the visible image has colour.

    Returns:
        uint8 (H*scale)x(W*scale)x3, or (H*scale)x(W*scale) for gray results.

    Raises:
        ValueError, ImageTooLargeError: as `model_input`, `wants_colour` and `enhance_image`.
    """
    image = _check_user_image(image, "image")
    check_pixel_limit("image", image.shape[1], image.shape[0], max_pixels)  # before any work on it
    in_colour = wants_colour(generator, image, colour)
    out = enhance_image(generator, model_input(generator, image, ir), scale, device, tile=tile,
                        tile_overlap=tile_overlap, bf16=bf16, max_pixels=max_pixels, tile_batch=tile_batch)
    return recolour(out, image) if in_colour else out
