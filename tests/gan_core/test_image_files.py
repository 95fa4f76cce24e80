"""Tests of gan_core.data's image files: decoding every PNG / JPEG flavour to uint8 RGB, truncated and oversized
files, and the streaming PNG writer (the rest of gan_core.data: test_data.py)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from gan_core.data import (
    ImageDecodeError,
    decode_image,
    encode_png,
    load_image,
)
from gan_core.data.images import ImageTooLargeError, PngWriter
from tests.gan_core.conftest import png16, random_rgb

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers


def _save(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _round257(values):
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


# 16-bit values where round(x / 257) differs from Pillow's high byte (x // 256).
VALUES16 = np.array([[0, 1000, 65535], [40000, 128, 30583]], dtype=np.uint16)


# ---------------------------------------------------------------- decoding


def test_decode_gray_png_repeats_channel():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(_save(Image.fromarray(gray, mode="L")))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_decode_rgba_drops_alpha_keeps_colour_under_transparency():
    rgba = np.dstack([random_rgb(5, 6), np.zeros((5, 6), np.uint8)])
    out = decode_image(_save(Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_decode_16bit_gray_rounds_x_over_257():
    data = _save(Image.fromarray(VALUES16))  # mode I;16
    out = decode_image(data)
    np.testing.assert_array_equal(out[:, :, 1], _round257(VALUES16))
    assert out[0, 1, 0] == 4  # 1000 / 257 = 3.89; the high byte would give 3


@pytest.mark.parametrize("color_type", [2, 6])
def test_decode_16bit_colour_png_rounds_full_precision(color_type):
    channels = 3 if color_type == 2 else 4
    values = np.stack([np.roll(VALUES16, k, axis=1) for k in range(channels)], axis=2)
    out = decode_image(png16(values, color_type))
    np.testing.assert_array_equal(out, _round257(values[:, :, :3]))


def test_decode_16bit_gray_alpha_png():
    values = np.stack([VALUES16, np.full_like(VALUES16, 65535)], axis=2)
    out = decode_image(png16(values, 4))
    np.testing.assert_array_equal(out, np.repeat(_round257(VALUES16)[:, :, None], 3, axis=2))


def test_decode_palette_png_with_transparency():
    palette_image = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = _save(palette_image, transparency=1)
    out = decode_image(data)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])  # transparent entry keeps its colour
    np.testing.assert_array_equal(out[1, 0], [0, 0, 255])


def test_decode_jpeg_and_cmyk():
    smooth = np.clip(np.add.outer(np.arange(32), np.arange(48))[:, :, None] * [3, 2, 1], 0, 255).astype(np.uint8)
    out = decode_image(_save(Image.fromarray(smooth), "JPEG", quality=95))
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3
    cmyk = decode_image(_save(Image.fromarray(smooth).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == (32, 48, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises_naming_it(tmp_path, fmt):
    data = _save(Image.fromarray(random_rgb(64, 64)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut") as caught:
        load_image(path)
    assert caught.value.name == str(path)
    assert isinstance(caught.value, ValueError)


def test_random_bytes_raise_naming_the_file():
    junk = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="junk.png"):
        decode_image(junk, name="junk.png")


def test_truncation_flag_must_stay_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(_save(Image.fromarray(random_rgb(4, 4))))


def test_encode_png_round_trip_and_validation():
    image = random_rgb(7, 9)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(image.astype(np.float32))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height whose pixel data stops after one row."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    one_row = zlib.compress(b"\x00" + bytes(3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", one_row)


def test_max_pixels_refuses_large_images_before_decoding(tmp_path):
    # The header claims 10000 x 8000 (80 MP) and one row follows: the limit is checked on the header,
    # before the 240 MB of pixels are allocated and decoded.
    # (Above 2 * PIL.Image.MAX_IMAGE_PIXELS, about 179 MP, Pillow refuses to open the file at all.)
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(10000, 8000))
    with pytest.raises(ImageTooLargeError, match=r"huge\.png.*10000x8000 = 80,000,000 pixels.*50,000,000") as caught:
        load_image(path, max_pixels=50_000_000)
    assert (caught.value.width, caught.value.height, caught.value.max_pixels) == (10000, 8000, 50_000_000)
    image = random_rgb(6, 7)
    assert decode_image(encode_png(image), max_pixels=42).shape == (6, 7, 3)  # the limit itself is allowed
    with pytest.raises(ImageTooLargeError, match="7x6 = 42 pixels"):
        decode_image(encode_png(image), name="small.png", max_pixels=41)


def _pillow_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # what jobs.enhance wrote before streaming
    return buffer.getvalue()


def _png_with_writer(image: np.ndarray, band_rows: int) -> bytes:
    buffer = io.BytesIO()
    writer = PngWriter(buffer, image.shape[1], image.shape[0])
    for top in range(0, image.shape[0], band_rows):
        writer.write_rows(image[top : top + band_rows])
    writer.close()
    return buffer.getvalue()


def _smooth_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus a little noise: every PNG filter type wins on some rows."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(-2, 3, (height, width, 3))
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], axis=-1) + noise
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height,width,band_rows", [(300, 400, 7), (64, 30000, 5), (1, 1, 1), (33, 17, 100)])
def test_png_writer_matches_pillow(height, width, band_rows):
    image = _smooth_photo(height, width) if height > 1 else random_rgb(1, 1)
    written = _png_with_writer(image, band_rows)
    np.testing.assert_array_equal(decode_image(written), image)  # lossless whatever the zlib
    from PIL import features

    if features.version("zlib") == zlib.ZLIB_RUNTIME_VERSION:  # the same zlib: the same bytes
        assert written == _pillow_png(image)
    # 300x400 and 64x30000 compress to more than one 64 KiB IDAT chunk: the chunking is Pillow's too.


def test_png_writer_refuses_wrong_rows():
    writer = PngWriter(io.BytesIO(), 4, 2)
    with pytest.raises(ValueError, match="uint8"):
        writer.write_rows(np.zeros((1, 5, 3), np.uint8))
    writer.write_rows(np.zeros((1, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="1 of 2 rows"):
        writer.close()
    with pytest.raises(ValueError, match="3 rows for an image 2 high"):
        writer.write_rows(np.zeros((2, 4, 3), np.uint8))
