"""Image decoding and encoding with Pillow: every image becomes uint8 HxWx3 RGB.

Training data comes from folders that nobody curated (camera JPEGs, 16-bit PNGs
from photo pipelines, palette PNGs, grayscale scans). Everything downstream
expects one format, so the conversions live here, once:

- grayscale ("1", "L", 16-bit "I;16"; 32-bit "I" is taken to hold 16-bit
  values) is repeated to 3 channels;
- an alpha channel (RGBA, LA, PA, palette with transparency) is dropped, not
  composited: the colour values under a transparent pixel are kept as stored;
- 16-bit samples become uint8 by rounding x / 257 (65535 -> 255, exact for 8-bit
  data stored as 16-bit). For 16-bit PNGs this is done on the full 16-bit values,
  for other 16-bit formats Pillow's own 8-bit reduction is used;
- CMYK, YCbCr and the other colour modes are converted to RGB by Pillow;
- only the first frame of multi-frame files (GIF, TIFF) is read;
- the EXIF orientation tag is applied, so pixels match what viewers show.

A corrupt or truncated file raises ImageDecodeError naming the file: a partially
decoded image is never returned (Pillow's LOAD_TRUNCATED_IMAGES must stay off).
With `max_pixels`, an image larger than that raises ImageTooLargeError before a
pixel is decoded (the size comes from the file header).

Encoding: `encode_png` for arrays in memory; `PngWriter` writes a PNG a band of
rows at a time, so an image too large to hold (the output of tiled inference)
can be written while it is computed. It reproduces Pillow's PNG encoder (same
per-row filter choice, same zlib settings, same IDAT chunking), so its files are
byte-identical to `Image.save(path, format="PNG")` wherever Python's zlib is the
one Pillow links (checked by the tests); elsewhere they are pixel-identical.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
"""Lower-case file suffixes that folder scans treat as images."""

# 16-bit PNG raw modes that Pillow reduces to the high byte. For each, the decode
# that yields the low bytes instead: the same bytes per pixel, so the PNG
# unfiltering is unchanged, only the unpacking differs.
_PNG16_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded completely.

    Attributes:
        name: the file (or label) that failed.
        reason: what the decoder said.
    """

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"cannot decode image {name!r}: {reason}")


class ImageTooLargeError(ValueError):
    """An image with more pixels than the caller allows.

    Attributes:
        name: the file (or label).
        width, height: its size in pixels.
        max_pixels: the limit it exceeds.
    """

    def __init__(self, name: str, width: int, height: int, max_pixels: int):
        self.name, self.width, self.height, self.max_pixels = name, width, height, max_pixels
        super().__init__(
            f"image {name!r} is {width}x{height} = {width * height:,} pixels, more than max_pixels {max_pixels:,}"
        )


def check_pixel_limit(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when width * height exceeds max_pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(name, width, height, max_pixels)


def decode_image(data: bytes, name: str = "<bytes>", *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) to uint8 RGB.

    Alpha channels are dropped (not composited); see the module docstring for
    every conversion.

    Args:
        data: the encoded file contents.
        name: a label for error messages, normally the file name.
        max_pixels: refuse images with more pixels than this, before decoding
            them (None: no limit of ours; Pillow still refuses decompression
            bombs of more than 2 * Image.MAX_IMAGE_PIXELS).

    Returns:
        A contiguous uint8 array of shape (H, W, 3).

    Raises:
        ImageDecodeError: the data is not a complete, decodable image.
        ImageTooLargeError: the image has more than max_pixels pixels.
        RuntimeError: Pillow's LOAD_TRUNCATED_IMAGES was switched on elsewhere,
            which would let truncated files decode silently.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; gan_core refuses to decode "
            "because truncated files would silently become partial images"
        )
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixel_limit(name, *im.size, max_pixels)  # from the header: nothing decoded yet
            if _is_png16_colour(im):
                rgb = _png16_to_rgb8(data, im)
            else:
                im.load()  # decode everything now: a truncated file fails here
                rgb = _to_rgb8(im)
            orientation = im.getexif().get(0x0112, 1)
    except ImageTooLargeError:
        raise
    # Decoders raise a zoo of exception types on corrupt input (OSError,
    # SyntaxError, ValueError, EOFError, struct.error, ...): all mean "bad file".
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(name, f"{type(error).__name__}: {error}") from error
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(name, f"unexpected decoded shape {rgb.shape}")
    rgb = np.ascontiguousarray(_apply_orientation(rgb, orientation))
    return rgb if rgb.flags.writeable else rgb.copy()  # Pillow's arrays are read-only views


def load_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode an image file to uint8 RGB (see decode_image).

    Args:
        path: the image file.
        max_pixels: see decode_image.

    Returns:
        A contiguous uint8 array of shape (H, W, 3).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageDecodeError: the file is corrupt, truncated or not an image.
        ImageTooLargeError: the image has more than max_pixels pixels.
    """
    path = Path(path)
    return decode_image(path.read_bytes(), name=str(path), max_pixels=max_pixels)


def encode_png(img: np.ndarray, compress_level: int = 3) -> bytes:
    """Encode a uint8 RGB image as PNG (lossless).

    Args:
        img: uint8 array of shape (H, W, 3).
        compress_level: zlib level 0-9; 3 (BasicSR's choice) is a good
            size/speed trade-off for photos.

    Returns:
        The PNG file contents.

    Raises:
        ValueError: img is not uint8 (H, W, 3).
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"encode_png expects a uint8 (H, W, 3) array, got {desc}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class PngWriter:
    """Write an 8-bit RGB PNG a band of rows at a time, as Pillow would write the whole image.

    Only the rows of one band (and a few row-sized buffers) are in memory at a
    time. Pillow's encoder (libImaging/ZipEncode.c, PngImagePlugin) is followed
    step by step: each row gets the filter among none, up, sub and Paeth whose
    bytes, read as signed, have the smallest absolute sum (ties go to the first
    in that order; the row above the first is black), zlib runs with
    `compress_level`, window 15, memLevel 9 and Z_FILTERED, and the stream is cut
    into IDAT chunks of max(65536, 4 * width) bytes. No chunk but IHDR, IDAT and
    IEND is written.

        with open(path, "wb") as file:
            writer = PngWriter(file, width, height)
            for band in bands:  # uint8 (rows, width, 3), top to bottom
                writer.write_rows(band)
            writer.close()

    Args:
        file: a binary file open for writing.
        width, height: the image size in pixels.
        compress_level: zlib level 0-9; 6 is Pillow's default.

    Raises:
        ValueError: a size is not positive.
    """

    # Rows are filtered in chunks of about this many bytes: numpy needs a few temporaries per chunk.
    FILTER_CHUNK_BYTES = 1 << 16

    def __init__(self, file: BinaryIO, width: int, height: int, compress_level: int = 6):
        if width < 1 or height < 1:
            raise ValueError(f"PngWriter: width and height must be >= 1, got {width}x{height}")
        self.file, self.width, self.height = file, width, height
        self.rows_written = 0
        self._chunk_size = max(65536, 4 * width)  # Pillow's ImageFile._save buffer: one IDAT per buffer
        self._pending = bytearray()
        self._previous = np.zeros(3 * width, np.uint8)  # the row above the first is black
        self._deflate = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
        self.file.write(b"\x89PNG\r\n\x1a\n")
        # IHDR: size, 8 bits per sample, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
        self._chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))

    def write_rows(self, rows: np.ndarray) -> None:
        """Append rows below those already written.

        Args:
            rows: uint8 (n, width, 3).

        Raises:
            ValueError: wrong dtype or shape, or more rows than the image has.
        """
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1:] != (
            self.width, 3
        ):
            desc = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
            raise ValueError(f"PngWriter.write_rows expects uint8 (n, {self.width}, 3), got {desc}")
        if self.rows_written + len(rows) > self.height:
            raise ValueError(f"PngWriter: {self.rows_written + len(rows)} rows for an image {self.height} high")
        row_bytes = 3 * self.width
        step = max(1, self.FILTER_CHUNK_BYTES // row_bytes)
        for start in range(0, len(rows), step):
            raw = np.ascontiguousarray(rows[start : start + step]).reshape(-1, row_bytes)
            self._pending += self._deflate.compress(_filter_rows(raw, self._previous))
            self._previous = raw[-1].copy()
            self._write_full_chunks()
        self.rows_written += len(rows)

    def close(self) -> None:
        """Finish the zlib stream and write the last IDAT chunk(s) and IEND (the file stays open).

        Raises:
            ValueError: fewer rows were written than the image has.
        """
        if self.rows_written != self.height:
            raise ValueError(f"PngWriter: {self.rows_written} of {self.height} rows written")
        self._pending += self._deflate.flush()
        self._write_full_chunks()
        if self._pending:
            self._chunk(b"IDAT", bytes(self._pending))
            self._pending.clear()
        self._chunk(b"IEND", b"")

    def _write_full_chunks(self) -> None:
        while len(self._pending) >= self._chunk_size:
            self._chunk(b"IDAT", bytes(self._pending[: self._chunk_size]))
            del self._pending[: self._chunk_size]

    def _chunk(self, tag: bytes, data: bytes) -> None:
        crc = zlib.crc32(data, zlib.crc32(tag))
        self.file.write(len(data).to_bytes(4, "big") + tag + data + crc.to_bytes(4, "big"))


def _filter_rows(raw: np.ndarray, previous: np.ndarray) -> bytes:
    """PNG-filter rows of RGB bytes as Pillow's ZipEncode.c: per row the cheapest of none, up, sub, Paeth.

    Args:
        raw: uint8 (n, row_bytes), the rows to filter.
        previous: uint8 (row_bytes,), the row above raw[0].

    Returns:
        n * (1 + row_bytes) bytes: each row's filter type, then its filtered bytes.
    """
    bpp = 3
    above = np.concatenate([previous[None], raw[:-1]])  # (n, row_bytes)
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    upper_left = np.zeros_like(raw)
    upper_left[:, bpp:] = above[:, :-bpp]
    a, b, c = (v.astype(np.int16) for v in (left, above, upper_left))
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
    del a, b, c, pa, pb, pc
    # Filter types 0 (none), 2 (up), 1 (sub), 4 (Paeth): the order Pillow tries them in, ties to the first.
    candidates = ((0, raw), (2, raw - above), (1, raw - left), (4, raw - predictor))
    costs = np.stack([_signed_magnitude_sums(filtered) for _, filtered in candidates])  # (4, n)
    best = costs.argmin(axis=0)  # argmin keeps the first of equal minima
    out = np.empty((len(raw), 1 + raw.shape[1]), np.uint8)
    for index, (filter_type, filtered) in enumerate(candidates):
        chosen = best == index
        out[chosen, 0] = filter_type
        out[chosen, 1:] = filtered[chosen]
    return out.tobytes()


def _signed_magnitude_sums(filtered: np.ndarray) -> np.ndarray:
    """Per row, the sum of |byte| with bytes read as signed (Pillow: v < 128 ? v : 256 - v)."""
    return np.abs(filtered.view(np.int8).astype(np.int16)).sum(axis=1, dtype=np.int64)


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to uint8 (H, W, 3)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (mode "I" holds it on older Pillow): keep full precision.
        values = np.asarray(im).astype(np.int64).clip(0, 65535)
        return _gray_to_rgb(((values + 128) // 257).astype(np.uint8))  # round(x / 257); no ties exist
    if mode == "RGB":
        return np.asarray(im)
    if mode == "RGBA":
        return np.asarray(im)[:, :, :3]  # alpha dropped, not composited
    if mode == "LA":
        return _gray_to_rgb(np.asarray(im)[:, :, 0])
    if mode in ("P", "PA"):
        # Through RGBA so that palette transparency is dropped like any alpha.
        return np.asarray(im.convert("RGBA"))[:, :, :3]
    return np.asarray(im.convert("RGB"))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _is_png16_colour(im: Image.Image) -> bool:
    """True for a 16-bit colour or gray+alpha PNG, which Pillow truncates to 8 bits."""
    if im.format != "PNG" or len(im.tile) != 1:
        return False
    rawmode = im.tile[0].args
    return rawmode in _PNG16_LOW_BYTE_RAWMODE or rawmode == "LA;16B"


def _png16_to_rgb8(data: bytes, im: Image.Image) -> np.ndarray:
    """Decode a 16-bit colour PNG at full precision, then round x / 257."""
    rawmode = im.tile[0].args
    if rawmode == "LA;16B":
        # Gray+alpha, 4 bytes per pixel (Pillow opens it as mode RGBA): unpacked
        # as 8-bit RGBA the bytes are (gray_hi, gray_lo, alpha_hi, alpha_lo).
        raw = _decode_with_rawmode(data, "RGBA").astype(np.int64)
        gray16 = raw[:, :, 0] * 256 + raw[:, :, 1]
        return _gray_to_rgb(((gray16 + 128) // 257).astype(np.uint8))
    high = _decode_with_rawmode(data, rawmode).astype(np.int64)
    low = _decode_with_rawmode(data, _PNG16_LOW_BYTE_RAWMODE[rawmode]).astype(np.int64)
    values16 = (high * 256 + low)[:, :, :3]  # alpha, if any, is dropped
    return ((values16 + 128) // 257).astype(np.uint8)


def _decode_with_rawmode(data: bytes, rawmode: str) -> np.ndarray:
    """Decode a PNG with Pillow's zip decoder using another unpacking raw mode."""
    with Image.open(io.BytesIO(data)) as im:
        im.tile = [im.tile[0]._replace(args=rawmode)]
        im.load()
        return np.asarray(im)


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1-8) to an (H, W, 3) array, as ImageOps.exif_transpose."""
    ops = {
        2: lambda a: a[:, ::-1],  # mirror left-right
        3: lambda a: a[::-1, ::-1],  # rotate 180
        4: lambda a: a[::-1],  # mirror top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # transpose
        6: lambda a: np.rot90(a, k=-1),  # rotate 90 clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
        8: lambda a: np.rot90(a, k=1),  # rotate 90 counter-clockwise
    }
    return ops[orientation](rgb) if orientation in ops else rgb
