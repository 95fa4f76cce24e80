"""From what a user has to a generator's input, and back to an image: RGB, gray, infrared + visible.

    in -> out   task                    model_input(generator, image, ir)
    3 -> 3      sr, denoise, lowlight   the RGB image
    1 -> 1      gray denoise, lowlight  its full-range luma (gan_core.tasks.LUMA, as PIL's "L")
    2 -> 1      fusion                  (infrared gray level, visible luma), same size

A fusion generator outputs the fused luma; `recolour` puts the visible image's chroma back. The tiled inference
itself is gan_core.inference, whose `enhance` goes the whole way (and which re-exports these names).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from torch import nn

from gan_core.data.paired import GRAY_MAX_CHANNEL_DIFF, GRAY_MEAN_CHANNEL_DIFF
from gan_core.tasks import LUMA


def _as_hwc(img: np.ndarray) -> np.ndarray:
    """HxW -> HxWx1 (a view); HxWxC as it is."""
    return img[..., None] if img.ndim == 2 else img


def _describe_array(img: object) -> str:
    return f"dtype {img.dtype} and shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__


def generator_channels(generator: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a generator: its `arch` record (every generator of
    gan_core.models keeps one); (3, 3) for a module without it (an RGB stand-in)."""
    arch = getattr(generator, "arch", None)
    if isinstance(arch, dict) and "num_in_ch" in arch and "num_out_ch" in arch:
        return int(arch["num_in_ch"]), int(arch["num_out_ch"])
    return 3, 3


def luma_image(img: np.ndarray) -> np.ndarray:
    """Full-range BT.601 luma (gan_core.tasks.LUMA) of a uint8 RGB image as uint8 H x W, as PIL's convert("L")
    computes it; a gray image (HxW, HxWx1) as it is.

    Raises:
        ValueError: not uint8 HxW, HxWx1 or HxWx3.
    """
    img = _check_user_image(img, "image")
    if img.ndim == 2:
        return img
    if img.shape[2] == 1:
        return img[..., 0]
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))


def is_gray(img: np.ndarray) -> bool:
    """Whether an image has no colour: HxW or HxWx1, or RGB whose channels stay within the tolerance that
    gan_core.data.paired allows an infrared image stored as RGB (a gray JPEG decodes a level or two apart)."""
    if img.ndim == 2 or img.shape[2] == 1:
        return True
    channels = img.astype(np.int16)
    differences = np.abs(np.stack([channels[..., 0] - channels[..., 1], channels[..., 1] - channels[..., 2]]))
    return bool(differences.max() <= GRAY_MAX_CHANNEL_DIFF and differences.mean() <= GRAY_MEAN_CHANNEL_DIFF)


def infrared_gray(ir: np.ndarray) -> np.ndarray:
    """The gray level (uint8 H x W) of an infrared image: a gray one as it is, an RGB-stored gray one (see
    `is_gray`) as the rounded mean of its channels, as training's pairs take it (gan_core.data.paired).

    Raises:
        ValueError: not a uint8 image, or the infrared image has colour (a false-colour palette, say).
    """
    ir = _check_user_image(ir, "infrared image")
    if ir.ndim == 2:
        return ir
    if ir.shape[2] == 1:
        return ir[..., 0]
    if not is_gray(ir):
        raise ValueError("the infrared image has colour (3 different channels); expected a single-channel IR image "
                         "(a false-colour thermal image cannot be fused)")
    return np.round(ir.astype(np.float32).mean(axis=2)).astype(np.uint8)


def _check_user_image(img: object, what: str) -> np.ndarray:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8
            and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3)))):
        raise ValueError(f"expected the {what} as a uint8 HxWx3 RGB (or HxW gray) array, got {_describe_array(img)}")
    return img


def model_input(generator_or_in_channels: nn.Module | int, image: np.ndarray,
                ir: np.ndarray | None = None) -> np.ndarray:
    """What a user gives -> the generator's input.

    Args:
        generator_or_in_channels: the generator, or its number of input channels.
        image: uint8 HxWx3 RGB (HxW or HxWx1 gray also taken): the image to enhance, or for fusion the
            visible image.
        ir: fusion only: the infrared image, gray (HxW, HxWx1, or RGB with equal channels), as large as `image`.

    Returns:
        uint8 H x W x C, C the generator's input channels: 3, the RGB image (a gray one repeated); 1, its
        luma (`luma_image`); 2, (infrared gray level, visible luma).

    Raises:
        ValueError: `ir` missing for a 2-channel generator or given to another, a colour infrared image, the two
            images of different sizes (both named), not uint8 images, or an unsupported channel count.
    """
    channels = (generator_or_in_channels if isinstance(generator_or_in_channels, int)
                else generator_channels(generator_or_in_channels)[0])
    image = _check_user_image(image, "image")
    if channels != 2 and ir is not None:
        raise ValueError(f"an infrared image is only for fusion (2-channel) generators; this one takes {channels} "
                         "channel(s)")
    if channels == 3:
        return np.repeat(_as_hwc(image), 3, axis=2) if image.ndim == 2 or image.shape[2] == 1 else image
    if channels == 1:
        return luma_image(image)[..., None]
    if channels == 2:
        if ir is None:
            raise ValueError("a fusion generator needs the infrared image (ir) as well as the visible one")
        ir_gray = infrared_gray(ir)
        if ir_gray.shape != image.shape[:2]:
            (h_ir, w_ir), (h_vi, w_vi) = ir_gray.shape, image.shape[:2]
            raise ValueError(f"the infrared image is {w_ir}x{h_ir} px, the visible image {w_vi}x{h_vi} px; "
                             "fusion needs both the same size")
        return np.stack([ir_gray, luma_image(image)], axis=2)
    raise ValueError(f"no input form for a generator of {channels} input channels (3: RGB, 1: luma, 2: fusion)")


def recolour(fused: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """The fused luma (uint8 H x W) with the visible image's colour (uint8 H x W x 3) -> uint8 H x W x 3.

    YCbCr recombination: the visible RGB in full-range BT.601 YCbCr (JPEG's, PIL's "YCbCr"), Y replaced by the
    fused luma, back to RGB. The inverse transform gives each of R, G and B its Y with weight 1, so that is
    computed as RGB + (fused - Y) per pixel, in float with the chroma unrounded (PIL's YCbCr would round Cb and
    Cr to 8 bits first), then rounded and clipped to 0..255 (where a channel clips, the hue shifts a little, as
    in any YCbCr round trip). A fused luma equal to the visible luma gives the visible image back within 1 level.

    Raises:
        ValueError: the shapes do not fit.
    """
    if fused.ndim != 2 or visible.ndim != 3 or visible.shape[2] != 3 or fused.shape != visible.shape[:2]:
        raise ValueError(f"recolour takes a uint8 HxW fused luma and an HxWx3 visible image of that size, got "
                         f"{fused.shape} and {visible.shape}")
    rgb = visible.astype(np.float32)
    visible_luma = rgb @ np.asarray(LUMA, np.float32)  # (H, W), unrounded
    out = rgb + (fused.astype(np.float32) - visible_luma)[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def recolour_bands(bands: Iterator[np.ndarray], visible: np.ndarray) -> Iterator[np.ndarray]:
    """`recolour` band by band (fusion is x1: a band of output rows covers the same rows of `visible`)."""
    top = 0
    for band in bands:
        yield recolour(band, visible[top : top + len(band)])
        top += len(band)


def wants_colour(generator: nn.Module, image: np.ndarray, colour: bool | None = None) -> bool:
    """Whether `enhance` recolours: only fusion generators (2 channels in, 1 out) do; `colour` when given, else
    whether the visible image has colour (`is_gray`).

    Raises:
        ValueError: `colour` given for a generator that is not a fusion one, or colour=True with a gray visible
            image (there is no colour to put back).
    """
    if generator_channels(generator) != (2, 1):
        if colour is not None:
            raise ValueError("colour is for fusion generators (2 channels in, 1 out) only")
        return False
    gray = is_gray(image)
    if colour and gray:
        raise ValueError("colour=True needs a colour visible image; this one is gray")
    return not gray if colour is None else colour
