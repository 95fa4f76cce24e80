"""Tiled inference: equal to a whole-image pass when the overlap covers the receptive field, any size, any scale;
memory bounded by the tile, not by a float copy of the output."""

import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gan_core.data import decode_image
from gan_core.data.images import ImageTooLargeError, PngWriter
from gan_core.inference import (
    enhance_bands,
    enhance_image,
    enhance_tensor,
    image_to_tensor,
    input_multiple,
)
from gan_core.models import rrdb_tiny
from gan_core.scoring import to_uint8

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


class CountingCalls(nn.Module):
    """Wraps a generator; records the batch size of every forward pass."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator, self.batches = generator, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.generator(x)


@pytest.mark.parametrize("scale", [4, 1])
def test_batched_tiles_equal_one_tile_at_a_time(scale):
    # 45 x 70 at tile 12: rows of 6 tiles (4 interior + 2 clipped at the image's edges), 4 rows.
    generator = CountingCalls(tiny(scale))
    x = torch.rand(2, 3, 45, 70)
    single = enhance_tensor(generator, x, scale, tile=12, tile_overlap=8)
    assert generator.batches == [2] * 24  # the default: one tile (of the 2 images) per pass
    generator.batches.clear()
    batched = enhance_tensor(generator, x, scale, tile=12, tile_overlap=8, tile_batch=3)
    # Per row, tiles of one context shape run together, 3 at most: the 4 interior ones as 3 + 1, the two edge
    # tiles (clipped) apart, or together where padding makes them the same shape (scale 1).
    assert sum(generator.batches) == 2 * 24 and max(generator.batches) == 2 * 3, generator.batches
    assert len(generator.batches) == 4 * (4 if scale == 4 else 3), generator.batches
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=0)
    img = np.random.default_rng(scale).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    one, many = (enhance_image(generator, img, scale, tile=12, tile_overlap=8, tile_batch=b) for b in (1, 8))
    assert np.abs(one.astype(int) - many).max() <= 1  # float sums in another order: a rounding tie at most
    assert (one != many).mean() < 1e-3


def test_rejects_bad_tile_settings():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="tile"):
        enhance_tensor(tiny(4), x, 4, tile=4)
    with pytest.raises(ValueError, match="tile"):
        enhance_tensor(tiny(4), x, 4, tile=8, tile_overlap=-1)
    with pytest.raises(ValueError, match="tile_batch"):
        enhance_image(tiny(4), np.zeros((16, 16, 3), np.uint8), 4, tile=8, tile_batch=0)


def test_input_multiple_matches_rrdb_unshuffle():
    assert [input_multiple(s) for s in (4, 2, 1)] == [1, 2, 4]


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_tiled_image_equals_whole_image_pixel_for_pixel(scale):
    generator = tiny(scale)
    img = np.random.default_rng(scale).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    whole = enhance_image(generator, img, scale)
    tiled = enhance_image(generator, img, scale, tile=12, tile_overlap=FULL_CONTEXT)
    assert tiled.shape == whole.shape == (37 * scale, 29 * scale, 3)
    # Tiles change float sums in the last bits (about 1e-7); only a value within that of a rounding tie
    # (x.5 after * 255) could round the other way. Every other pixel must be identical.
    values = enhance_tensor(generator, image_to_tensor(img), scale)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    at_tie = np.abs(values - np.floor(values) - 0.5) < 1e-3
    differs = tiled != whole
    assert not (differs & ~at_tie).any(), f"{differs.sum()} values differ away from rounding ties"


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_bands_round_the_tiled_float_output_exactly(scale):
    # Rounding tile by tile is rounding the whole: the same tiles give the same bytes as the float path.
    generator = tiny(scale)
    img = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    floats = enhance_tensor(generator, image_to_tensor(img), scale, tile=12, tile_overlap=8)  # overlap < RF: seams
    expected = (floats[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # tensor2img
    np.testing.assert_array_equal(enhance_image(generator, img, scale, tile=12, tile_overlap=8), expected)
    bands = list(enhance_bands(generator, img, scale, tile=12, tile_overlap=8))
    # One band per row of tiles; the last is cut where the image ends (37 = 3 * 12 + 1 input rows).
    assert [len(band) for band in bands] == [12 * scale] * 3 + [1 * scale]
    np.testing.assert_array_equal(np.concatenate(bands), expected)


def test_max_pixels_refuses_larger_images():
    img = np.zeros((30, 40, 3), np.uint8)
    with pytest.raises(ImageTooLargeError, match="40x30 = 1,200 pixels, more than max_pixels 1,199"):
        enhance_image(tiny(4), img, 4, tile=16, max_pixels=1199)
    with pytest.raises(ImageTooLargeError):
        enhance_bands(tiny(4), img, 4, tile=16, max_pixels=1199)  # at the call, before any band is computed
    assert enhance_image(tiny(4), img, 4, tile=16, max_pixels=1200).shape == (120, 160, 3)


class ConvShuffle(nn.Module):
    """A cheap stand-in generator for the memory tests: one 3x3 conv, then a pixel shuffle."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.shuffle(self.conv(x))


class LargestFloatTensor(TorchDispatchMode):
    """Sees the output of every torch op run inside it and keeps the size of the largest float one."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.largest = max(self.largest, value.numel())
        return out


def _photo(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx % 256, yy % 256, (xx * yy) % 256], axis=-1).astype(np.uint8)


def test_tiled_inference_holds_no_float_copy_of_the_output():
    # 256x256 at x4: the output has 3.1 M values; as float32 (what enhance_image held before) 12.6 MB,
    # and rounding it made two more float32 copies in numpy.
    torch.manual_seed(0)
    generator = ConvShuffle(4).eval()
    img = _photo(256)
    tracemalloc.start()  # sees numpy's buffers (not torch's: LargestFloatTensor watches those)
    try:
        with LargestFloatTensor() as torch_ops:
            out = enhance_image(generator, img, 4, tile=32, tile_overlap=4)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # torch: one tile's activations, (32 + 2 * 4)**2 * 48 values, 2.4% of the output's.
    assert torch_ops.largest < out.size / 16
    # numpy: the uint8 output itself and one tile's float32 rounding; a float32 output alone is 4x out.nbytes.
    assert numpy_peak < 1.5 * out.nbytes
    # The watcher does see a whole-output float tensor where there is one.
    with LargestFloatTensor() as control:
        enhance_tensor(generator, image_to_tensor(img), 4, tile=32, tile_overlap=4)
    assert control.largest >= out.size


def test_bands_streamed_to_png_hold_one_band_not_the_output(tmp_path):
    # 512x512 at x4: 12.6 MB of uint8 output, written band by band (32 input rows = 128 output rows at a time).
    torch.manual_seed(0)
    generator = ConvShuffle(4).eval()
    img = _photo(512)
    path = tmp_path / "out.png"
    tracemalloc.start()
    try:
        with open(path, "wb") as file:
            writer = PngWriter(file, 512 * 4, 512 * 4)
            for band in enhance_bands(generator, img, 4, tile=32, tile_overlap=4):
                writer.write_rows(band)
            writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output_bytes = (512 * 4) ** 2 * 3
    # A band (0.8 MB), one tile's rounding, the PNG filter's buffers and zlib's state: about 2.5 MB.
    assert peak < output_bytes / 3
    np.testing.assert_array_equal(decode_image(path.read_bytes()),
                                  enhance_image(generator, img, 4, tile=32, tile_overlap=4))


# -- tasks: gray (1 -> 1) and fusion (2 -> 1) generators, from what a user has -------------------------------

def tiny_task_generator(in_ch: int, out_ch: int, seed: int = 0) -> torch.nn.Module:
    from gan_core.models import build_generator

    torch.manual_seed(seed)
    return build_generator(scale=1, num_in_ch=in_ch, num_out_ch=out_ch, num_feat=8, num_block=1,
                           num_grow_ch=4).eval()


def _smooth_rgb(height: int, width: int, seed: int, low: int = 0, high: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 12, (height, width, 3))
    img = np.stack([xx * 200 // width, yy * 200 // height, (xx + yy) * 100 // (width + height)], -1) + noise
    return np.clip(img, 0, 200).astype(np.float64) * (high - low) / 200 + low


def test_gray_generator_takes_luma_and_gives_gray_images():
    from PIL import Image

    from gan_core.inference import enhance, model_input

    generator = tiny_task_generator(1, 1)
    rgb = _smooth_rgb(37, 29, 0).astype(np.uint8)
    x = model_input(generator, rgb)
    assert x.shape == (37, 29, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))  # PIL's "L"
    out = enhance(generator, rgb, 1, tile=16, tile_overlap=8)
    assert out.shape == (37, 29) and out.dtype == np.uint8
    # HxW and HxWx1 are the same input; bands are gray rows that stack to the image.
    np.testing.assert_array_equal(enhance_image(generator, x[..., 0], 1, tile=16, tile_overlap=8), out)
    bands = list(enhance_bands(generator, x, 1, tile=16, tile_overlap=8))
    assert [band.shape for band in bands] == [(16, 29), (16, 29), (5, 29)]
    np.testing.assert_array_equal(np.concatenate(bands), out)
    with pytest.raises(ValueError, match="HxW .*gray image for a 1-channel generator"):
        enhance_image(generator, rgb, 1)
    with pytest.raises(ValueError, match="colour is for fusion"):
        enhance(generator, rgb, 1, colour=True)


def _fusion_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    visible = _smooth_rgb(height, width, 1).astype(np.uint8)
    ir = np.random.default_rng(2).integers(0, 256, (height, width), dtype=np.uint8)
    return ir, visible


def test_fusion_tiles_equal_one_pass_on_an_odd_sized_pair():
    from gan_core.inference import enhance, model_input

    generator = tiny_task_generator(2, 1)
    ir, visible = _fusion_pair(203, 189)
    x = model_input(generator, visible, ir=ir)
    assert x.shape == (203, 189, 2)
    np.testing.assert_array_equal(x[..., 0], ir)
    # x1 RRDB works at 1/4 resolution: about 17 quarter-res convs, ~75 input pixels of receptive radius.
    whole = enhance_tensor(generator, image_to_tensor(x), 1)
    tiled = enhance_tensor(generator, image_to_tensor(x), 1, tile=32, tile_overlap=80)
    assert whole.shape == tiled.shape == (1, 1, 203, 189)
    torch.testing.assert_close(tiled, whole, atol=2e-5, rtol=0)
    gray_whole = enhance(generator, visible, 1, ir=ir, colour=False)
    gray_tiled = enhance(generator, visible, 1, ir=ir, colour=False, tile=32, tile_overlap=80)
    assert gray_whole.shape == (203, 189) and np.abs(gray_whole.astype(int) - gray_tiled).max() <= 1
    assert (gray_whole != gray_tiled).mean() < 1e-3  # only at rounding ties
    colour_tiled = enhance(generator, visible, 1, ir=ir, tile=32, tile_overlap=80)  # the default: colour
    assert colour_tiled.shape == (203, 189, 3)
    assert np.abs(colour_tiled.astype(int) - enhance(generator, visible, 1, ir=ir)).max() <= 1


def test_recolour_keeps_the_visible_chroma():
    from PIL import Image

    from gan_core.inference import luma_image, recolour

    visible = _smooth_rgb(40, 48, 3, low=60, high=190).astype(np.uint8)
    # The visible luma as the fused one gives the visible image back.
    assert np.abs(recolour(luma_image(visible), visible).astype(int) - visible).max() <= 1
    # A brighter fused luma changes Y only: Cb and Cr stay (no channel clips in 60..190 + 30).
    fused = np.clip(luma_image(visible).astype(int) + 30, 0, 255).astype(np.uint8)
    out = recolour(fused, visible)
    ycbcr_in = np.asarray(Image.fromarray(visible).convert("YCbCr")).astype(int)
    ycbcr_out = np.asarray(Image.fromarray(out).convert("YCbCr")).astype(int)
    assert np.abs(ycbcr_out[..., 1:] - ycbcr_in[..., 1:]).max() <= 1
    assert np.abs(ycbcr_out[..., 0] - fused).max() <= 1


def test_fusion_output_is_gray_for_a_gray_visible_image():
    from gan_core.inference import enhance

    generator = tiny_task_generator(2, 1)
    ir, visible = _fusion_pair(20, 24)
    gray_visible = np.repeat(visible[..., :1], 3, axis=2)
    assert enhance(generator, gray_visible, 1, ir=ir).shape == (20, 24)
    assert enhance(generator, visible[..., 0], 1, ir=ir).shape == (20, 24)
    with pytest.raises(ValueError, match="needs a colour visible image"):
        enhance(generator, gray_visible, 1, ir=ir, colour=True)


def test_fusion_inputs_are_checked():
    from gan_core.inference import model_input

    generator = tiny_task_generator(2, 1)
    ir, visible = _fusion_pair(8, 12)
    # An infrared image stored as RGB with (nearly) equal channels is gray: its channel mean, as in training.
    ir_rgb = np.stack([ir, ir, ir], axis=2)
    np.testing.assert_array_equal(model_input(generator, visible, ir=ir_rgb)[..., 0], ir)
    with pytest.raises(ValueError, match="needs the infrared image"):
        model_input(generator, visible)
    with pytest.raises(ValueError, match="infrared image has colour"):
        model_input(generator, visible, ir=visible)
    with pytest.raises(ValueError, match="infrared image is 12x8 px, the visible image 10x8 px"):
        model_input(generator, visible[:, :10], ir=ir)
    with pytest.raises(ValueError, match="only for fusion"):
        model_input(3, visible, ir=ir)
    with pytest.raises(ValueError, match="HxWx2 image .*fusion generator"):
        enhance_image(generator, visible, 1)
