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
folder prepared here holds the same crops as BasicSR's DIV2K_train_HR_sub. Images
too small to train on are skipped: with crop_size, those whose shorter side is
below it (BasicSR's script fails on them; every row is then a full crop), else
those below MIN_IMAGE_SIDE.

Folders are walked by `scan_image_folder`: hidden names are skipped, symlinks are
followed, and what cannot be followed (a broken link, a link loop) is reported,
never looped on.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
import warnings
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

MIN_IMAGE_SIDE = 16
"""Without cropping, images whose shorter side is below this many pixels are skipped. Training cuts
patches of data.patch_size (at least 8, at least 32 with the default VGG discriminator, 128 by
default) and leaves out smaller images anyway; below 16 px an image is an icon or a broken export."""


@dataclass
class ShardReport:
    """What write_shards did.

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


@dataclass
class FolderScan:
    """What scan_image_folder found.

    Attributes:
        files: image files, sorted by path relative to the folder (POSIX separators).
        unreadable: (path relative to the folder, reason) for each entry that could not be read:
            broken symlinks, symlinks that resolve to themselves, folders that cannot be listed.
        not_followed: (path relative to the folder, reason) for each symlinked folder that was not
            walked because its folder was walked anyway: loops back to a containing folder, and
            second links to one folder. Nothing under them is missed.
    """

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    not_followed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """unreadable and not_followed together, in that order."""
        return self.unreadable + self.not_followed


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
    scan = scan_image_folder(src_dir)
    report = ShardReport(files_read=len(scan.files), skipped=list(scan.problems))
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        staged = _write_staged_shards(scan.files, src_dir, staging, report, crop_size=crop_size, step=step,
                                      thresh_size=thresh_size, min_size=min_size, rows_per_shard=rows_per_shard,
                                      progress=progress)
        if report.rows_written == 0:
            found = (f"{report.files_read} image files, all skipped" if report.files_read
                     else f"no image files (suffixes {', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
            raise NoUsableImagesError(f"no usable image in {src_dir}: {found}; nothing written, {out_dir} is as it was",
                                      report)
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


def _write_staged_shards(
    files: list[Path], src_dir: Path, staging: Path, report: ShardReport, *, crop_size: int | None,
    step: int | None, thresh_size: int, min_size: int, rows_per_shard: int,
    progress: Callable[[int, int], None] | None,
) -> list[Path]:
    """Decode, cut and write every file's rows into shards in staging; skipped files go into report.

    Returns:
        The staged shard files, in order (report.rows_written counts their rows).
    """
    staged: list[Path] = []
    pending: list[dict] = []

    def flush(rows: list[dict]) -> None:
        path = staging / f"part-{len(staged):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)
        staged.append(path)
        report.rows_written += len(rows)

    for done, path in enumerate(files, start=1):
        name = path.relative_to(src_dir).as_posix()
        try:
            img = decode_image(path.read_bytes(), name=name)
        except (ImageDecodeError, OSError) as error:
            report.skipped.append((name, getattr(error, "reason", str(error))))
            img = None
        too_small = None if img is None else _too_small(img.shape[0], img.shape[1], crop_size, min_size)
        if too_small:
            report.skipped.append((name, too_small))
        elif img is not None:
            pending.extend(_rows_of(img, name, crop_size, step, thresh_size))
        while len(pending) >= rows_per_shard:
            flush(pending[:rows_per_shard])
            pending = pending[rows_per_shard:]
        if progress is not None:
            progress(done, len(files))
    if pending:
        flush(pending)
    return staged


def _too_small(height: int, width: int, crop_size: int | None, min_size: int) -> str | None:
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


def find_image_files(folder: str | Path) -> list[Path]:
    """Image files under folder (recursive), sorted by relative path; see scan_image_folder.

    Entries that cannot be followed (broken symlinks, symlink loops, folders that
    cannot be listed) are skipped with a UserWarning each; use scan_image_folder
    to get them as a list.

    Args:
        folder: the folder to scan.

    Returns:
        Paths (folder / relative path) whose suffix, in any case, is in IMAGE_EXTENSIONS.

    Raises:
        FileNotFoundError: folder does not exist.
        NotADirectoryError: folder is not a folder.
    """
    scan = scan_image_folder(folder)
    for name, reason in scan.problems:
        warnings.warn(f"{folder}: skipped {name}: {reason}", UserWarning, stacklevel=2)
    return scan.files


def scan_image_folder(folder: str | Path) -> FolderScan:
    """Find the image files under folder, recursively, without ever looping or crashing on odd entries.

    - Names starting with "." (files and folders, at any depth) are skipped, silently.
    - Symlinks are followed, to files and to folders. Each folder is walked once: the
      real folders first, then the symlinked ones; a symlink back to a folder that
      contains it (a loop) or to a folder already walked is reported and not followed.
    - A broken symlink, a symlink the system refuses to resolve (ELOOP: a link to
      itself, two links to each other) and a subfolder that cannot be listed are
      reported.
    - Other files, and entries that are neither file nor folder (sockets, FIFOs),
      are ignored.

    Args:
        folder: the folder to scan.

    Returns:
        A FolderScan: the image files (suffix in IMAGE_EXTENSIONS, any case) as
        folder / relative path, sorted by relative path, and the problems.

    Raises:
        FileNotFoundError: folder does not exist.
        NotADirectoryError: folder is not a folder.
    """
    folder = Path(folder)
    root = os.stat(folder)
    if not stat.S_ISDIR(root.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
    scan = FolderScan()
    found: list[tuple[str, Path]] = []
    root_identity = (root.st_dev, root.st_ino)
    walked = {root_identity: "."}  # folder identity (device, inode) -> the name it was walked under
    # Items are (path, name relative to folder, identities of the folders above it). Real folders go on
    # `folders`, symlinked ones wait on `links` until no real folder is left, so that a real folder is
    # walked under its own name rather than under a link's.
    folders = [(folder, "", frozenset([root_identity]))]
    links: list[tuple[Path, str, frozenset, tuple[int, int]]] = []
    while folders or links:
        if not folders:
            path, name, ancestors, identity = links.pop(0)
            if identity in ancestors:
                scan.not_followed.append((name, f"symlink loop: leads back to {walked[identity]}, not followed"))
            elif identity in walked:
                scan.not_followed.append((name, f"same folder as {walked[identity]}, already scanned, not followed"))
            else:
                walked[identity] = name
                folders.append((path, name, ancestors | {identity}))
            continue
        directory, relative, ancestors = folders.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted((entry for entry in listing if not entry.name.startswith(".")),
                                 key=lambda entry: entry.name)
        except OSError as error:
            scan.unreadable.append((relative or ".", f"cannot list folder: {error.strerror or error}"))
            continue
        subfolders = []
        for entry in entries:
            name = f"{relative}/{entry.name}" if relative else entry.name
            path = directory / entry.name
            try:
                info = entry.stat()  # follows symlinks
            except OSError as error:
                scan.unreadable.append((name, _unfollowable(path, error)))
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if entry.is_symlink():
                    links.append((path, name, ancestors, identity))
                elif identity in walked:  # a real folder seen twice: a bind mount
                    reason = f"same folder as {walked[identity]}, already scanned, not followed"
                    scan.not_followed.append((name, reason))
                else:
                    walked[identity] = name
                    subfolders.append((path, name, ancestors | {identity}))
            elif stat.S_ISREG(info.st_mode) and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((name, path))
        folders.extend(reversed(subfolders))  # popped in name order
    scan.files = [path for _, path in sorted(found, key=lambda item: item[0])]
    return scan


def _unfollowable(path: Path, error: OSError) -> str:
    """Why os.stat failed on a folder entry, for the report."""
    if not path.is_symlink():
        return f"cannot read: {error.strerror or error}"
    if error.errno == errno.ELOOP:
        return "symlink loop: following the link leads back to it"
    target = os.readlink(path)
    if error.errno == errno.ENOENT:
        return f"broken symlink: {target} does not exist"
    return f"cannot follow symlink to {target}: {error.strerror or error}"


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
