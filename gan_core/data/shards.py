"""Parquet shards of high-resolution training images (PNG bytes plus metadata).

`write_shards` turns an image folder into `part-00000.parquet`, `part-00001.parquet`,
... in a plain folder (no `_metadata` / `_common_metadata` files) that
`ray.data.read_parquet(folder)` and pyarrow read directly. Each row is one image
or one sub-image:

    image   binary   PNG bytes, 8-bit RGB
    height  int32    pixels
    width   int32    pixels
    source  string   file name relative to the source folder (POSIX separators)
    tile    string   "y_x" (top-left corner of the sub-image) or "" for a whole image

Sub-images follow BasicSR's scripts/data_preparation/extract_subimages.py, so a
folder prepared here holds the same crops as BasicSR's DIV2K_train_HR_sub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gan_core.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, encode_png

SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
        ("tile", pa.string()),
    ]
)


@dataclass
class ShardReport:
    """What write_shards did.

    Attributes:
        files_read: image files found in the source folder (skipped ones included).
        rows_written: rows (images or sub-images) stored in the shards.
        shard_paths: the shard files written, in order.
        skipped: (file name, reason) for every image file that produced no row.
    """

    files_read: int = 0
    rows_written: int = 0
    shard_paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs, naming up to three skipped files."""
        line = f"read {self.files_read} image files, wrote {self.rows_written} rows in {len(self.shard_paths)} shards"
        if self.skipped:
            shown = "; ".join(f"{name}: {reason}" for name, reason in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            line += f", skipped {len(self.skipped)} ({shown}{more})"
        return line


def subimage_starts(length: int, crop_size: int, step: int, thresh_size: int) -> list[int]:
    """Start offsets of sub-images along one axis, as BasicSR's extract_subimages.py.

    starts = arange(0, length - crop_size + 1, step); when the remainder past the
    last crop exceeds thresh_size, one more crop flush with the end is added. An
    axis shorter than crop_size gives one crop at 0 covering the whole axis
    (BasicSR would fail there).

    Args:
        length: image height or width.
        crop_size: sub-image size.
        step: distance between starts.
        thresh_size: remainders up to this many pixels are dropped.

    Returns:
        The start offsets.
    """
    if length <= crop_size:
        return [0]
    starts = list(range(0, length - crop_size + 1, step))
    if length - (starts[-1] + crop_size) > thresh_size:
        starts.append(length - crop_size)
    return starts


def write_shards(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    crop_size: int | None = None,
    step: int | None = None,
    thresh_size: int = 0,
    min_size: int = 0,
    rows_per_shard: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> ShardReport:
    """Convert every image under src_dir (recursive, sorted) into Parquet shards.

    Files are written atomically (temporary name, then os.replace). Shards left
    in out_dir by an earlier run and not rewritten now are deleted at the end,
    so the folder always holds exactly this run's data.

    Args:
        src_dir: folder of images (suffixes in IMAGE_EXTENSIONS, any case).
        out_dir: folder for part-NNNNN.parquet; created if missing.
        crop_size: cut each image into crop_size sub-images (BasicSR uses 480
            for DIV2K); None stores whole images.
        step: distance between sub-images; None means crop_size // 2 (BasicSR's
            480 / 240).
        thresh_size: see subimage_starts (BasicSR: 0).
        min_size: skip images whose shorter side is below this.
        rows_per_shard: rows per Parquet file.
        progress: called as progress(files_done, files_total) after each file.

    Returns:
        A ShardReport; undecodable and too-small files are listed in `skipped`.

    Raises:
        FileNotFoundError: src_dir is not a folder.
        ValueError: a size argument is out of range.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"write_shards: source folder {src_dir} does not exist")
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"write_shards: crop_size must be >= 1, got {crop_size}")
    if crop_size is not None:
        step = crop_size // 2 if step is None else step
        if step < 1:
            raise ValueError(f"write_shards: step must be >= 1, got {step}")
    if thresh_size < 0 or min_size < 0 or rows_per_shard < 1:
        raise ValueError(
            f"write_shards: need thresh_size >= 0, min_size >= 0, rows_per_shard >= 1, "
            f"got {thresh_size}, {min_size}, {rows_per_shard}"
        )
    files = find_image_files(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ShardReport(files_read=len(files))
    pending: list[dict] = []
    for done, path in enumerate(files, start=1):
        name = path.relative_to(src_dir).as_posix()
        try:
            img = decode_image(path.read_bytes(), name=name)
        except (ImageDecodeError, OSError) as error:
            report.skipped.append((name, getattr(error, "reason", str(error))))
            img = None
        if img is not None and min(img.shape[:2]) < min_size:
            report.skipped.append((name, f"{img.shape[0]}x{img.shape[1]} is smaller than min_size {min_size}"))
            img = None
        if img is not None:
            pending.extend(_rows_of(img, name, crop_size, step, thresh_size))
        while len(pending) >= rows_per_shard:
            _flush(pending[:rows_per_shard], out_dir, report)
            pending = pending[rows_per_shard:]
        if progress is not None:
            progress(done, len(files))
    if pending:
        _flush(pending, out_dir, report)
    _remove_stale_shards(out_dir, keep=report.shard_paths)
    return report


def find_image_files(folder: str | Path) -> list[Path]:
    """Image files under folder (recursive), sorted by relative path; hidden files excluded.

    Args:
        folder: the folder to scan.

    Returns:
        Paths whose suffix (any case) is in IMAGE_EXTENSIONS.
    """
    folder = Path(folder)
    found = [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def shard_files(path: str | Path) -> list[Path]:
    """The Parquet files of a shard folder (sorted), or [path] for a single file.

    Files starting with "." or "_" (temporary files, Spark/Hive metadata) are
    ignored, as pyarrow's dataset discovery does.

    Args:
        path: a folder written by write_shards, or one .parquet file.

    Returns:
        The shard paths; empty for a folder without shards.

    Raises:
        FileNotFoundError: path does not exist.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no shard file or folder at {path}")
    return sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))


def read_shards(path: str | Path, columns: list[str] | None = None) -> Iterator[dict]:
    """Iterate over the rows of the shards, one dict per row, in file order.

    Args:
        path: shard folder or file.
        columns: the columns to read (all when None); reading without "image"
            is cheap, for listing.

    Yields:
        {column: value} dicts.
    """
    for shard in shard_files(path):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


def load_shard_images(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Decode every image of the shards into memory.

    Args:
        path: shard folder or file.

    Returns:
        (name, uint8 (H, W, 3) array) pairs; the name is the source file,
        followed by "@y_x" for a sub-image.

    Raises:
        ImageDecodeError: a stored image is corrupt.
    """
    images = []
    for row in read_shards(path, columns=["image", "source", "tile"]):
        name = f"{row['source']}@{row['tile']}" if row["tile"] else row["source"]
        images.append((name, decode_image(row["image"], name=name)))
    return images


def _rows_of(img: np.ndarray, name: str, crop_size: int | None, step: int | None, thresh_size: int) -> list[dict]:
    """The shard rows of one decoded image: the whole image or its sub-images."""
    height, width = img.shape[:2]
    if crop_size is None:
        return [_row(img, name, "")]
    return [
        _row(img[y : y + crop_size, x : x + crop_size], name, f"{y}_{x}")
        for y in subimage_starts(height, crop_size, step, thresh_size)
        for x in subimage_starts(width, crop_size, step, thresh_size)
    ]


def _row(img: np.ndarray, source: str, tile: str) -> dict:
    return {"image": encode_png(np.ascontiguousarray(img)), "height": img.shape[0], "width": img.shape[1],
            "source": source, "tile": tile}


def _flush(rows: list[dict], out_dir: Path, report: ShardReport) -> None:
    """Write rows as the next shard file, atomically."""
    final = out_dir / f"part-{len(report.shard_paths):05d}.parquet"
    # A dot-prefixed temporary name: readers (pyarrow, Ray) skip it if we crash.
    temporary = out_dir / f".{final.name}.{os.getpid()}.tmp"
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    pq.write_table(table, temporary)
    os.replace(temporary, final)
    report.shard_paths.append(final)
    report.rows_written += len(rows)


def _remove_stale_shards(out_dir: Path, keep: list[Path]) -> None:
    keep_names = {path.name for path in keep}
    for stale in out_dir.glob("part-*.parquet"):
        if stale.name not in keep_names:
            stale.unlink()
