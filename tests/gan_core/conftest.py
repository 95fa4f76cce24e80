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
