"""A JPEG round trip in plain tensor code, batched, on any device, with a quality per image.

Real-ESRGAN simulates JPEG with DiffJPEG (BasicSR's `basicsr/utils/diffjpeg.py`, non-differentiable
rounding): RGB -> YCbCr, 4:2:0 chroma by 2x2 averaging, 8x8 DCT, quantisation with the standard
tables scaled by the quality factor, and back. We do the same arithmetic, for three reasons: it runs
where the model runs (a real codec such as torchvision's encode_jpeg works image by image and, for
CUDA tensors, only with one quality per call), it takes a float quality per image as Real-ESRGAN
draws it, and it gives the same LR images as Real-ESRGAN's pipeline (the golden test compares it with
BasicSR's DiffJPEG). It is a model of JPEG, not a codec: no entropy coding, chroma upsampled by
repetition rather than libjpeg's fancy upsampling.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

_LUMA_TABLE = [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
               [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77],
               [24, 35, 55, 64, 81, 104, 113, 92], [49, 64, 78, 87, 103, 121, 120, 101],
               [72, 92, 95, 98, 112, 100, 103, 99]]
_CHROMA_CORNER = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
# JFIF's RGB <-> YCbCr (full range, 128 offset on chroma).
_RGB_TO_YCBCR = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
_YCBCR_TO_RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The float32 tables of DiffJPEG on `device`: quantisation tables (transposed, as DiffJPEG stores them),
    the DCT and inverse DCT as (8, 8, 8, 8) tensors for tensordot, their alpha scalings, colour matrices."""
    luma = torch.tensor(_LUMA_TABLE, dtype=torch.float32).T
    chroma = torch.full((8, 8), 99.0)
    chroma[:4, :4] = torch.tensor(_CHROMA_CORNER, dtype=torch.float32).T
    dct = torch.zeros(8, 8, 8, 8, dtype=torch.float64)
    idct = torch.zeros(8, 8, 8, 8, dtype=torch.float64)
    for x, y, u, v in itertools.product(range(8), repeat=4):
        dct[x, y, u, v] = math.cos((2 * x + 1) * u * math.pi / 16) * math.cos((2 * y + 1) * v * math.pi / 16)
        idct[x, y, u, v] = math.cos((2 * u + 1) * x * math.pi / 16) * math.cos((2 * v + 1) * y * math.pi / 16)
    alpha = torch.tensor([1 / math.sqrt(2)] + [1.0] * 7, dtype=torch.float64)
    alpha = torch.outer(alpha, alpha)
    tables = {"luma": luma, "chroma": chroma, "dct": dct.float(), "idct": idct.float(),
              "dct_scale": (alpha * 0.25).float(), "idct_alpha": alpha.float(),
              "to_ycbcr": torch.tensor(_RGB_TO_YCBCR, dtype=torch.float32).T,
              "to_rgb": torch.tensor(_YCBCR_TO_RGB, dtype=torch.float32).T,
              "ycbcr_shift": torch.tensor([0.0, 128.0, 128.0]), "rgb_shift": torch.tensor([0.0, -128.0, -128.0])}
    return {name: value.to(device) for name, value in tables.items()}


def quality_factor(quality: torch.Tensor) -> torch.Tensor:
    """The libjpeg scaling of the quantisation tables: 50 / q below 50, 2 - q / 50 above (as DiffJPEG)."""
    return torch.where(quality < 50, 5000.0 / quality, 200.0 - quality * 2) / 100.0


def jpeg_round_trip(img: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    """Compress and decompress a batch of RGB images like JPEG, one quality per image.

    Args:
        img: float32 (B, 3, H, W) in [0, 1] (values outside are clamped by the caller in Real-ESRGAN), any
            device. Sizes that are not multiples of 16 are zero-padded for the codec and cropped back.
        quality: (B,) or a number, JPEG quality in [1, 100] (a float: Real-ESRGAN draws it uniformly).

    Returns:
        float32 (B, 3, H, W) in [0, 1].
    """
    tables = _constants(img.device)
    n, _, height, width = img.shape
    quality = torch.as_tensor(quality, dtype=torch.float32, device=img.device).reshape(-1).expand(n)
    factor = quality_factor(quality).view(n, 1, 1, 1)
    img = F.pad(img.float(), (0, -width % 16, 0, -height % 16), mode="constant", value=0.0)

    # -- compress: (B, 3, H, W) -> YCbCr planes -> 8x8 blocks of quantised DCT coefficients
    pixels = img.permute(0, 2, 3, 1) * 255  # (B, H, W, 3)
    ycbcr = torch.tensordot(pixels, tables["to_ycbcr"], dims=1) + tables["ycbcr_shift"]
    luma = ycbcr[..., 0]
    chroma = [F.avg_pool2d(ycbcr[..., c].unsqueeze(1), kernel_size=2, stride=2).squeeze(1) for c in (1, 2)]
    planes = [(luma, tables["luma"]), (chroma[0], tables["chroma"]), (chroma[1], tables["chroma"])]
    restored = []
    for plane, table in planes:
        blocks = _split_blocks(plane)  # (B, blocks, 8, 8)
        coefficients = tables["dct_scale"] * torch.tensordot(blocks - 128, tables["dct"], dims=2)
        scaled_table = table * factor  # (B, 1, 8, 8)
        quantised = torch.round(coefficients / scaled_table)
        # -- decompress
        coefficients = quantised * scaled_table
        blocks = 0.25 * torch.tensordot(coefficients * tables["idct_alpha"], tables["idct"], dims=2) + 128
        restored.append(_merge_blocks(blocks, plane.shape[1], plane.shape[2]))
    luma = restored[0]
    chroma = [plane.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) for plane in restored[1:]]
    ycbcr = torch.stack([luma, *chroma], dim=-1)  # (B, H, W, 3)
    rgb = torch.tensordot(ycbcr + tables["rgb_shift"], tables["to_rgb"], dims=1).permute(0, 3, 1, 2)
    rgb = rgb.clamp(0.0, 255.0) / 255
    return rgb[:, :, :height, :width].contiguous()


def _split_blocks(plane: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H/8 * W/8, 8, 8), blocks in row-major order."""
    n, height, width = plane.shape
    return plane.view(n, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4).reshape(n, -1, 8, 8)


def _merge_blocks(blocks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of _split_blocks."""
    n = blocks.shape[0]
    return blocks.view(n, height // 8, width // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, height, width)
