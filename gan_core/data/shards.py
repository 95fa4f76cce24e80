"""Parquet shards of training images and image pairs (PNG bytes plus metadata).

`write_shards` turns an image folder into `part-00000.parquet`, `part-00001.parquet`,
... in a plain folder (no `_metadata` / `_common_metadata` files) that
`ray.data.read_parquet(folder)` and pyarrow read directly. Each row is one image
or one sub-image:

    image   binary   PNG bytes, 8-bit RGB
    height  int32    pixels
    width   int32    pixels
    source  string   file name relative to the source folder (POSIX separators)
    tile    string   "y_x" (top-left corner of the sub-image) or "" for a whole image
    input   binary   PNG bytes of the input image of a pair (noisy / low-light / infrared), cut at the
                     same window as `image` (the target); null for unpaired data, absent in older shards

Paired shards come from `gan_core.data.paired.write_paired_shards`; `decode_example` turns a row into
the (H, W, 3) image or the (H, W, 6) input + target stack that training uses.

Sub-images follow BasicSR's scripts/data_preparation/extract_subimages.py, so a
folder prepared here holds the same crops as BasicSR's DIV2K_train_HR_sub. Images
too small to train on are skipped: with crop_size, those whose shorter side is
below it (BasicSR's script fails on them; every row is then a full crop), else
those below MIN_IMAGE_SIDE.

Folders are walked by `scan_image_folder` (gan_core.data.folders): hidden names are
skipped, symlinks are followed, and what cannot be followed (a broken link, a link
loop) is reported, never looped on.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gan_core.data.folders import FolderScan, find_image_files, scan_image_folder  # noqa: F401  (importable here too)
from gan_core.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, encode_png

SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
        ("tile", pa.string()),
        ("input", pa.binary()),
    ]
)
OPTIONAL_COLUMNS = ("input",)
"""Columns that older shards lack; read_shards gives None for them."""

MIN_IMAGE_SIDE = 16
"""Without cropping, images whose shorter side is below this many pixels are skipped. Training cuts
patches of data.patch_size (at least 8, at least 32 with the default VGG discriminator, 128 by
default) and leaves out smaller images anyway; below 16 px an image is an icon or a broken export."""


@dataclass
class ShardReport:
    """What write_shards or write_paired_shards did.

    Attributes:
        files_read: image files found in the source folder (skipped ones included).
        rows_written: rows (images or sub-images) stored in the shards.
        shard_paths: the shard files written, in order.
        skipped: (file name, reason) for every image file that produced no row, and for every
            entry of the folder that could not be followed (broken symlink, symlink loop).
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


class NoUsableImagesError(ValueError):
    """write_shards found no image that gives a row; the output folder was left as it was.

    Attributes:
        report: the ShardReport, with every skipped file and why.
    """

    def __init__(self, message: str, report: ShardReport):
        super().__init__(message)
        self.report = report


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

    Nothing in out_dir changes until every row is written. The shards are first
    written into a hidden staging folder inside out_dir (on the same file system,
    so moving them is a rename; Parquet readers skip hidden names). Only when at
    least one row was written are they renamed to part-NNNNN.parquet and the
    earlier run's shards that were not replaced deleted, so that the folder
    holds exactly this run's data. On any error, or when no image gave a row,
    the staging folder is removed and out_dir is as it was (a folder this call
    created is removed again). A crash during the final renames (a few
    milliseconds) can leave new shards beside old ones; a crash before them
    leaves only the hidden staging folder.

    Args:
        src_dir: folder of images (suffixes in IMAGE_EXTENSIONS, any case).
        out_dir: folder for part-NNNNN.parquet; created if missing.
        crop_size: cut each image into crop_size sub-images (BasicSR uses 480
            for DIV2K); None stores whole images.
        step: distance between sub-images; None means crop_size // 2 (BasicSR's
            480 / 240).
        thresh_size: see subimage_starts (BasicSR: 0).
        min_size: skip images whose shorter side is below this; it can only raise
            the built-in minimum (crop_size when cropping, else MIN_IMAGE_SIDE).
        rows_per_shard: rows per Parquet file.
        progress: called as progress(files_done, files_total) after each file.

    Returns:
        A ShardReport; undecodable and too-small files, and entries of src_dir
        that cannot be followed, are listed in `skipped`.

    Raises:
        FileNotFoundError: src_dir is not a folder.
        NoUsableImagesError: no image gave a row (out_dir is unchanged).
        ValueError: a size argument is out of range.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"write_shards: source folder {src_dir} does not exist")
    step = check_tiling("write_shards", crop_size, step, thresh_size, min_size, rows_per_shard)
    scan = scan_image_folder(src_dir)
    report = ShardReport(files_read=len(scan.files), skipped=list(scan.problems))

    def rows() -> Iterator[dict]:
        for done, path in enumerate(scan.files, start=1):
            name = path.relative_to(src_dir).as_posix()
            try:
                img = decode_image(path.read_bytes(), name=name)
            except (ImageDecodeError, OSError) as error:
                report.skipped.append((name, getattr(error, "reason", str(error))))
                img = None
            too_small = None if img is None else too_small_reason(img.shape[0], img.shape[1], crop_size, min_size)
            if too_small:
                report.skipped.append((name, too_small))
            elif img is not None:
                yield from tile_rows(img, name, crop_size, step, thresh_size)
            if progress is not None:
                progress(done, len(scan.files))

    def nothing_usable() -> str:
        found = (f"{report.files_read} image files, all skipped" if report.files_read
                 else f"no image files (suffixes {', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
        return f"no usable image in {src_dir}: {found}"

    return commit_rows(rows(), out_dir, report, rows_per_shard=rows_per_shard, nothing_usable=nothing_usable)


def check_tiling(caller: str, crop_size: int | None, step: int | None, thresh_size: int, min_size: int,
                 rows_per_shard: int) -> int | None:
    """Validate the size arguments of write_shards / write_paired_shards.

    Returns:
        The step to use: step, or crop_size // 2 when it is None (None without cropping).

    Raises:
        ValueError: an argument is out of range, naming the caller.
    """
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"{caller}: crop_size must be >= 1, got {crop_size}")
    if crop_size is not None:
        step = crop_size // 2 if step is None else step
        if step < 1:
            raise ValueError(f"{caller}: step must be >= 1, got {step}")
    if thresh_size < 0 or min_size < 0 or rows_per_shard < 1:
        raise ValueError(
            f"{caller}: need thresh_size >= 0, min_size >= 0, rows_per_shard >= 1, "
            f"got {thresh_size}, {min_size}, {rows_per_shard}"
        )
    return step


def commit_rows(rows: Iterable[dict], out_dir: Path, report: ShardReport, *, rows_per_shard: int,
                nothing_usable: Callable[[], str]) -> ShardReport:
    """Write rows into a hidden staging folder in out_dir, then swap them in as part-NNNNN.parquet.

    The safety of write_shards, for every shard writer: out_dir changes only after the last row is
    written, and then only by renames followed by the deletion of the earlier run's leftover shards.

    Args:
        rows: shard rows (dicts of SHARD_SCHEMA columns; missing optional ones become null), consumed once.
        out_dir: the shard folder; created if missing (and removed again if nothing was written).
        report: filled in: rows_written, shard_paths.
        rows_per_shard: rows per Parquet file.
        nothing_usable: called when no row came, for the start of the NoUsableImagesError message.

    Returns:
        report.

    Raises:
        NoUsableImagesError: rows was empty (out_dir is unchanged).
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged: list[Path] = []
    pending: list[dict] = []

    def flush(batch: list[dict]) -> None:
        path = staging / f"part-{len(staged):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(batch, schema=SHARD_SCHEMA), path)
        staged.append(path)
        report.rows_written += len(batch)

    try:
        staging.mkdir()
        for row in rows:
            pending.append(row)
            if len(pending) == rows_per_shard:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        if report.rows_written == 0:
            raise NoUsableImagesError(f"{nothing_usable()}; nothing written, {out_dir} is as it was", report)
        # The only step that touches what was there: renames within one file system, then deletions.
        for number, path in enumerate(staged):
            final = out_dir / f"part-{number:05d}.parquet"
            os.replace(path, final)
            report.shard_paths.append(final)
        _remove_stale_shards(out_dir, keep=report.shard_paths)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not report.shard_paths:
            _remove_if_empty(out_dir)
    return report


def too_small_reason(height: int, width: int, crop_size: int | None, min_size: int) -> str | None:
    """Why an image is too small for the shards, or None when it is not."""
    built_in = crop_size if crop_size is not None else MIN_IMAGE_SIDE
    if min(height, width) >= max(built_in, min_size):
        return None
    if min_size > built_in:
        limit = f"min_size {min_size}"
    elif crop_size is not None:
        limit = f"crop_size {crop_size}"
    else:
        limit = f"the minimum of {MIN_IMAGE_SIDE} px"
    return f"{width}x{height} px: shorter side below {limit}"


def shards_hold_pairs(path: str | Path) -> bool:
    """Whether local shards carry an input image in every row (paired shards, `write_paired_shards`), read from the
    Parquet footers only (the `input` column's null count), not from the images.

    Raises:
        FileNotFoundError: path does not exist.
    """
    import pyarrow.parquet as pq

    files = shard_files(path)
    for file in files:
        metadata = pq.ParquetFile(file).metadata
        names = metadata.schema.names
        if "input" not in names:
            return False
        column = names.index("input")
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_null_count or stats.null_count > 0:
                return False
    return bool(files)


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
            is cheap, for listing. An OPTIONAL_COLUMNS column that a shard lacks
            (shards written before it existed) reads as None.

    Yields:
        {column: value} dicts.
    """
    for shard in shard_files(path):
        parquet = pq.ParquetFile(shard)
        absent = [name for name in columns or () if name in OPTIONAL_COLUMNS and name not in parquet.schema_arrow.names]
        present = [name for name in columns if name not in absent] if columns is not None else None
        for batch in parquet.iter_batches(batch_size=64, columns=present):
            for row in batch.to_pylist():
                yield {**row, **dict.fromkeys(absent)} if absent else row


def decode_example(image_bytes: bytes, input_bytes: bytes | None, name: str) -> np.ndarray:
    """One shard row as a training example: the image alone, or the input and target of a pair stacked.

    Used by load_shard_images and by the training workers, so that both read rows the same way.

    Args:
        image_bytes: the row's `image` column (the target of a pair).
        input_bytes: the row's `input` column, or None for an unpaired row.
        name: a label for error messages.

    Returns:
        uint8 (H, W, 3) for an unpaired row; uint8 (H, W, 6) for a pair: channels 0..2 the input,
        3..5 the target.

    Raises:
        ImageDecodeError: a stored image is corrupt, or the input's size differs from the target's.
    """
    target = decode_image(image_bytes, name=name)
    if input_bytes is None:
        return target
    source = decode_image(input_bytes, name=f"{name} (input)")
    if source.shape != target.shape:
        raise ImageDecodeError(name, f"input is {source.shape[1]}x{source.shape[0]} px, "
                                     f"target {target.shape[1]}x{target.shape[0]} px")
    return np.concatenate([source, target], axis=2)


def load_shard_images(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Decode every row of the shards into memory (see decode_example).

    Args:
        path: shard folder or file.

    Returns:
        (name, uint8 array) pairs: (H, W, 3) for unpaired rows, (H, W, 6) (input, target) for
        pairs; the name is the source file, followed by "@y_x" for a sub-image.

    Raises:
        ImageDecodeError: a stored image is corrupt.
    """
    images = []
    for row in read_shards(path, columns=["image", "input", "source", "tile"]):
        name = f"{row['source']}@{row['tile']}" if row["tile"] else row["source"]
        images.append((name, decode_example(row["image"], row["input"], name)))
    return images


def tile_rows(img: np.ndarray, name: str, crop_size: int | None, step: int | None, thresh_size: int, *,
              encode_input: Callable[[np.ndarray], bytes] = encode_png) -> Iterator[dict]:
    """The shard rows of one decoded image or pair: the whole of it, or its sub-images.

    Args:
        img: uint8 (H, W, 3), or (H, W, 6) for a pair (input, target), cut at the same windows.
        name: the `source` of the rows.
        crop_size, step, thresh_size: as write_shards (step already resolved); crop_size None: one row.
        encode_input: PNG encoder of a pair's input window (H, W, 3).
    """
    height, width = img.shape[:2]
    windows = ([(0, 0, "")] if crop_size is None else
               [(y, x, f"{y}_{x}") for y in subimage_starts(height, crop_size, step, thresh_size)
                for x in subimage_starts(width, crop_size, step, thresh_size)])
    size = crop_size or max(height, width)
    for y, x, tile in windows:
        window = img[y : y + size, x : x + size]  # (h, w, 3 or 6)
        row = {"image": encode_png(np.ascontiguousarray(window[..., -3:])), "height": window.shape[0],
               "width": window.shape[1], "source": name, "tile": tile}
        if img.shape[2] == 6:
            row["input"] = encode_input(np.ascontiguousarray(window[..., :3]))
        yield row


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # fails, harmlessly, when something else was put there meanwhile
    except OSError:
        pass


def _remove_stale_shards(out_dir: Path, keep: list[Path]) -> None:
    keep_names = {path.name for path in keep}
    for stale in out_dir.glob("part-*.parquet"):
        if stale.name not in keep_names:
            stale.unlink()
