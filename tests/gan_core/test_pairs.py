"""Tests of gan_core.data.pairs: random (LQ, GT) patches, the resumable PatchSampler, validation pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gan_core.data import (
    PatchSampler,
    bicubic_downscale,
    bicubic_upscale,
    imresize,
    random_patch_pair,
    validation_pair,
)
from tests.gan_core.conftest import random_rgb


def _hr(height, width, seed=0):
    return torch.from_numpy(random_rgb(height, width, seed)).permute(2, 0, 1).contiguous()


def test_random_patch_pair_shapes_and_bicubic_lq():
    generator = torch.Generator().manual_seed(0)
    lq, gt = random_patch_pair(_hr(50, 60), patch_size=32, scale=4, color_jitter=0.2, generator=generator)
    assert lq.shape == (3, 8, 8) and gt.shape == (3, 32, 32)
    assert lq.dtype == gt.dtype == torch.float32 and 0 <= gt.min() and gt.max() <= 1
    torch.testing.assert_close(lq, bicubic_downscale(gt, 4))
    lq, _ = random_patch_pair(_hr(50, 60), patch_size=32, scale=4, generator=generator,
                              degradation={"noise_sigma": (5, 10), "jpeg_quality": (40, 80)})
    assert lq.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="multiple of scale"):
        random_patch_pair(_hr(50, 60), patch_size=30, scale=4, generator=generator)
    with pytest.raises(ValueError, match="valid"):
        random_patch_pair(_hr(50, 60), patch_size=32, scale=4, degradation={"blur": (1, 2)}, generator=generator)


def test_random_patch_is_a_crop_of_the_image():
    hr = _hr(40, 44)
    _, gt = random_patch_pair(hr, patch_size=16, scale=2, hflip=False, rot90=False,
                              generator=torch.Generator().manual_seed(3))
    patch = (gt * 255).round().to(torch.uint8)
    found = [(y, x) for y in range(0, 25, 2) for x in range(0, 29, 2) if torch.equal(hr[:, y:y + 16, x:x + 16], patch)]
    assert len(found) == 1  # and on the scale grid


def _sampler(images, **overrides):
    kwargs = {"patch_size": 16, "scale": 4, "batch_size": 3, "seed": 7}
    kwargs.update(overrides)
    return PatchSampler(images, **kwargs)


def test_patch_sampler_shapes_determinism_and_skips():
    images = [random_rgb(40, 30, seed=s) for s in range(4)] + [random_rgb(10, 60, seed=9)]
    sampler = _sampler(images, names=[f"img{i}" for i in range(5)])
    assert sampler.skipped == ["img4"] and len(sampler.names) == 4
    lq, gt = next(sampler)
    assert lq.shape == (3, 3, 4, 4) and gt.shape == (3, 3, 16, 16)
    assert 0 <= lq.min() and lq.max() <= 1
    twin = _sampler(images)
    torch.testing.assert_close(next(twin)[1], gt, atol=0, rtol=0)
    assert not torch.equal(next(_sampler(images, seed=8))[1], gt)
    assert not torch.equal(next(_sampler(images, rank=1))[1], gt)
    with pytest.raises(ValueError, match="none of the"):
        _sampler([random_rgb(8, 8)])


def test_patch_sampler_epochs_visit_each_image_once():
    colours = [np.full((20, 20, 3), 40 * i, np.uint8) for i in range(5)]
    sampler = _sampler(colours, batch_size=5, color_jitter=0.0)
    orders = []
    for epoch in range(3):
        assert sampler.epoch == epoch
        _, gt = next(sampler)
        orders.append([round(v) for v in (gt[:, 0, 0, 0] * 255 / 40).tolist()])
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # a new permutation each epoch


def test_patch_sampler_groups_draw_each_source_photo_equally_often():
    # Source "big" is cut into 8 tiles, "small" into 1 (plus a too-small tile): by tile, "small" would get 1/9.
    colours = [np.full((20, 20, 3), 10, np.uint8)] * 8 + [np.full((20, 20, 3), 200, np.uint8), random_rgb(8, 8)]
    groups = ["big"] * 8 + ["small", "small"]
    sampler = _sampler(colours, batch_size=90, groups=groups)
    assert sampler.skipped == ["image-9"]
    _, gt = next(sampler)
    small = (gt[:, 0, 0, 0] * 255).round().eq(200).float().mean().item()
    assert 0.35 < small < 0.65, small  # about 1/2 (by tile it would be ~0.11)
    twin = _sampler(colours, batch_size=90, groups=groups)
    torch.testing.assert_close(next(twin)[1], gt, atol=0, rtol=0)  # seeded like the plain order
    state = sampler.state_dict()
    expected = next(sampler)[1]
    twin.load_state_dict(state)
    torch.testing.assert_close(next(twin)[1], expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="groups has 2 labels for 10 images"):
        _sampler(colours, groups=["a", "b"])


def test_patch_sampler_resume_gives_the_same_next_batch():
    images = [(f"im{s}", _hr(24 + 4 * s, 28, seed=s)) for s in range(5)]
    degradation = {"blur_sigma": (0.5, 1.5), "noise_sigma": (1, 10)}
    sampler = _sampler(images, degradation=degradation, color_jitter=0.1)
    for _ in range(3):  # 9 visits: crosses an epoch boundary
        next(sampler)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    expected = next(sampler)
    resumed = _sampler(images, degradation=degradation, color_jitter=0.1)
    resumed.load_state_dict(state)
    for got, want in zip(next(resumed), expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="images"):
        _sampler(images[:3]).load_state_dict(state)


def test_validation_pair_mod_crops_and_quantizes():
    hr = random_rgb(50, 63)
    lq, gt = validation_pair(hr, 4)
    assert gt.shape == (1, 3, 48, 60) and lq.shape == (1, 3, 12, 15)
    torch.testing.assert_close(gt[0], torch.from_numpy(hr[:48, :60]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)
    unrounded = imresize(gt, 0.25).clamp(0, 1)
    assert (lq - unrounded).abs().max() <= 0.5 / 255 + 1e-6
    assert bicubic_upscale(lq, 4).shape == gt.shape
