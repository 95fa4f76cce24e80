"""Tiled inference: equal to a whole-image pass when the overlap covers the receptive field, any size, any scale."""

import numpy as np
import pytest
import torch

from gan_core.evaluation import to_uint8
from gan_core.inference import enhance_image, enhance_tensor, image_to_tensor, input_multiple
from gan_core.models import rrdb_tiny

# rrdb_tiny's receptive radius is about 18 LR pixels (conv_first, 15 dense-block convs, conv_body,
# then the upsampling convs at 2x and 4x); 20 covers it.
FULL_CONTEXT = 20


def tiny(scale: int) -> torch.nn.Module:
    torch.manual_seed(scale)
    return rrdb_tiny(scale=scale).eval()


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_tiled_equals_whole_image_pass(scale):
    generator = tiny(scale)
    x = torch.rand(1, 3, 37, 29)  # odd sides: scale 2 and 1 need padding to their multiple
    whole = enhance_tensor(generator, x, scale)
    tiled = enhance_tensor(generator, x, scale, tile=12, tile_overlap=FULL_CONTEXT)
    assert whole.shape == tiled.shape == (1, 3, 37 * scale, 29 * scale)
    torch.testing.assert_close(tiled, whole, atol=2e-5, rtol=0)


def test_without_overlap_tiles_do_show_seams():
    # The equality above is not vacuous: cutting context changes the output near tile borders.
    generator = tiny(4)
    x = torch.rand(1, 3, 32, 32)
    whole = enhance_tensor(generator, x, 4)
    seamed = enhance_tensor(generator, x, 4, tile=16, tile_overlap=0)
    assert (seamed - whole).abs().max() > 1e-3


def test_batched_input_and_unaligned_tile_settings():
    generator = tiny(2)
    x = torch.rand(2, 3, 21, 18)
    whole = enhance_tensor(generator, x, 2)
    # tile and overlap are rounded up to the scale-2 multiple; no piece may be odd-sized.
    tiled = enhance_tensor(generator, x, 2, tile=9, tile_overlap=FULL_CONTEXT + 1)
    assert tiled.shape == (2, 3, 42, 36)
    torch.testing.assert_close(tiled, whole, atol=2e-5, rtol=0)


@pytest.mark.parametrize("height,width", [(1, 1), (3, 5), (2, 9)])
def test_tiny_images_at_scale_1(height, width):
    # Reflect padding cannot pad a 1-3 px side by 3; replicate takes over.
    out = enhance_image(tiny(1), np.full((height, width, 3), 128, np.uint8), 1, tile=8, tile_overlap=4)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8


def test_enhance_image_rounds_like_tensor2img():
    generator = tiny(4)
    img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    out = enhance_image(generator, img, 4)
    with torch.no_grad():
        expected = to_uint8(generator(image_to_tensor(img)))
    assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                 np.zeros((8, 8, 4), np.uint8), [[0, 0, 0]]])
def test_rejects_non_rgb8(bad):
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        enhance_image(tiny(4), bad, 4)


def test_rejects_bad_tile_settings():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="tile"):
        enhance_tensor(tiny(4), x, 4, tile=4)
    with pytest.raises(ValueError, match="tile"):
        enhance_tensor(tiny(4), x, 4, tile=8, tile_overlap=-1)


def test_input_multiple_matches_rrdb_unshuffle():
    assert [input_multiple(s) for s in (4, 2, 1)] == [1, 2, 4]
