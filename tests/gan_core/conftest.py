import struct
import zlib

import numpy as np
import pytest
import torch

from gan_core.config import config_from_dict


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests share two cores with each other; one intra-op thread keeps timings and results stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**sections):
    """A config for a 1-block, 16-feature generator on 32 px patches, with section overrides."""
    base = {
        "generator": {"num_feat": 16, "num_block": 1, "num_grow_ch": 8, "scale": 4},
        "discriminator": {"name": "vgg", "num_feat": 8},
        "data": {"patch_size": 32, "batch_size": 2},
        "train": {"total_steps": 6, "pretrain_steps": 0, "ema_decay": 0.9},
        "optim": {"g_lr": 1e-3, "d_lr": 1e-3},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def batches(cfg, seed=0):
    """Endless deterministic (lq, gt) batches: smooth random images, LR by average pooling."""
    generator = torch.Generator().manual_seed(seed)
    size, scale, count = cfg.data.patch_size, cfg.generator.scale, cfg.data.batch_size
    while True:
        coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
        gt = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        lq = torch.nn.functional.avg_pool2d(gt, scale)
        yield lq, gt


def random_rgb(height, width, seed=0):
    """A seeded uint8 (H, W, 3) noise image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour PNGs).

    color_type: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA; values (H, W[, C]) uint16.
    Rows use the "Sub" filter (difference to the pixel on the left), which only
    decodes right if the decoder knows the true bytes per pixel.
    """
    height, width = values.shape[:2]
    bytes_per_pixel = 2 * (values.shape[2] if values.ndim == 3 else 1)
    rows = values.astype(">u2").reshape(height, -1).view(np.uint8).reshape(height, -1).astype(np.int64)
    left = np.pad(rows, ((0, 0), (bytes_per_pixel, 0)))[:, :-bytes_per_pixel]
    filtered = ((rows - left) % 256).astype(np.uint8)
    raw = b"".join(b"\x01" + filtered[y].tobytes() for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
