"""Tests of gan_core.data.stream: per-row patches that are a function of (seed, epoch, row id) alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gan_core.data import bicubic_downscale, encode_png
from gan_core.data.stream import crop_row, crop_rows, row_key
from tests.gan_core.conftest import random_rgb

ARGS = {"patch_size": 32, "scale": 4, "seed": 7}


def _png(height=48, width=56, seed=0):
    return encode_png(random_rgb(height, width, seed))


def test_same_seed_epoch_and_row_give_the_same_pair():
    data = _png()
    first = crop_row(data, row_id=row_key(1, 5), epoch=3, **ARGS)
    again = crop_row(data, row_id=row_key(1, 5), epoch=3, **ARGS)
    lq, gt = first
    assert lq.shape == (3, 8, 8) and gt.shape == (3, 32, 32) and lq.dtype == gt.dtype == torch.float32
    assert 0 <= gt.min() and gt.max() <= 1
    torch.testing.assert_close(again[0], lq, rtol=0, atol=0)
    torch.testing.assert_close(again[1], gt, rtol=0, atol=0)
    torch.testing.assert_close(lq, bicubic_downscale(gt.unsqueeze(0), 4)[0])  # default LR: bicubic, as PatchSampler


def test_epoch_row_and_seed_each_change_the_patch():
    data = _png(96, 96)
    base = crop_row(data, row_id=row_key(0, 0), epoch=0, **ARGS)[1]
    others = [crop_row(data, row_id=row_key(0, 0), epoch=1, **ARGS)[1],
              crop_row(data, row_id=row_key(0, 1), epoch=0, **ARGS)[1],
              crop_row(data, row_id=row_key(1, 0), epoch=0, **ARGS)[1],
              crop_row(data, row_id=row_key(0, 0), epoch=0, **(ARGS | {"seed": 8}))[1]]
    for other in others:
        assert not torch.equal(base, other)


def test_degradation_is_seeded_per_row_and_blind_rows_have_no_lq():
    data = _png()
    degradation = {"blur_sigma": (0.5, 2.0), "noise_sigma": (1.0, 10.0), "poisson_scale": (0.0, 0.0),
                   "jpeg_quality": (40, 90)}
    one = crop_row(data, row_id=3, epoch=2, degradation=degradation, **ARGS)
    two = crop_row(data, row_id=3, epoch=2, degradation=degradation, **ARGS)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)
    lq, gt = crop_row(data, row_id=3, epoch=2, with_lq=False, **ARGS)
    assert lq is None
    torch.testing.assert_close(gt, one[1], rtol=0, atol=0)  # the crop does not depend on the LR making


def test_decoded_images_give_the_same_pair_as_their_png():
    image = random_rgb(40, 40, 3)
    from_png = crop_row(encode_png(image), row_id=9, epoch=0, **ARGS)
    from_array = crop_row(image, row_id=9, epoch=0, **ARGS)
    torch.testing.assert_close(from_png[1], from_array[1], rtol=0, atol=0)


def test_unusable_rows_are_left_out_of_a_batch():
    images = [_png(48, 48, 0), _png(20, 64, 1), b"not an image", _png(64, 40, 2)]
    out = crop_rows(images, [10, 11, 12, 13], [0, 0, 0, 1], patch_size=32, scale=4, seed=0)
    assert out["kept"].tolist() == [0, 3] and out["row_id"].tolist() == [10, 13] and out["epoch"].tolist() == [0, 1]
    assert out["gt"].shape == (2, 3, 32, 32) and out["lq"].shape == (2, 3, 8, 8) and out["gt"].dtype == np.float32
    np.testing.assert_array_equal(out["gt"][1], crop_row(images[3], row_id=13, epoch=1, patch_size=32, scale=4,
                                                         seed=0)[1].numpy())
    empty = crop_rows([b"junk"], [0], [0], patch_size=32, scale=4, seed=0, with_lq=False)
    assert empty["gt"].shape == (0, 3, 32, 32) and "lq" not in empty


def test_bad_patch_arguments_raise():
    with pytest.raises(ValueError, match="multiple of scale"):
        crop_row(_png(), row_id=0, epoch=0, patch_size=30, scale=4, seed=0)
