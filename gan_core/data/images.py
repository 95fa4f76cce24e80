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
"""

from __future__ import annotations

import io
from pathlib import Path

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


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) to uint8 RGB.

    Alpha channels are dropped (not composited); see the module docstring for
    every conversion.

    Args:
        data: the encoded file contents.
        name: a label for error messages, normally the file name.

    Returns:
        A contiguous uint8 array of shape (H, W, 3).

    Raises:
        ImageDecodeError: the data is not a complete, decodable image.
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
            if _is_png16_colour(im):
                rgb = _png16_to_rgb8(data, im)
            else:
                im.load()  # decode everything now: a truncated file fails here
                rgb = _to_rgb8(im)
            orientation = im.getexif().get(0x0112, 1)
    # Decoders raise a zoo of exception types on corrupt input (OSError,
    # SyntaxError, ValueError, EOFError, struct.error, ...): all mean "bad file".
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(name, f"{type(error).__name__}: {error}") from error
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(name, f"unexpected decoded shape {rgb.shape}")
    rgb = np.ascontiguousarray(_apply_orientation(rgb, orientation))
    return rgb if rgb.flags.writeable else rgb.copy()  # Pillow's arrays are read-only views


def load_image(path: str | Path) -> np.ndarray:
    """Read and decode an image file to uint8 RGB (see decode_image).

    Args:
        path: the image file.

    Returns:
        A contiguous uint8 array of shape (H, W, 3).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageDecodeError: the file is corrupt, truncated or not an image.
    """
    path = Path(path)
    return decode_image(path.read_bytes(), name=str(path))


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
