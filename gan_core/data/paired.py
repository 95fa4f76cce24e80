"""Paired examples for denoising, low-light enhancement and infrared + visible fusion.

A paired data set is a folder with two sub-folders that hold the same file names (the extension may
differ: a.png in ir/ pairs with a.jpg in vi/; sub-folders are matched recursively on the relative path):

    task      input/   target/   public sets in this layout
    denoise   noisy/   clean/    (SIDD, PolyU, ... once sorted into these two folders)
    lowlight  low/     high/     LOL: LOL/our485 and LOL/eval15 as they are
    fusion    ir/      vi/       TNO, RoadScene, LLVIP, M3FD (rename or link their infrared and
                                 visible folders to ir/ and vi/)

One example is one uint8 (H, W, 6) array: channels 0..2 the input (noisy / low-light / infrared, an
infrared image as its gray level repeated in 3 channels), channels 3..5 the target (clean / normal
light / visible):

    pairs, problems = load_pairs("data/LOL/eval15", "lowlight")     # [(name, (H, W, 6))], [(file, why)]
    low, high = split_pair(pairs[0][1])                              # (H, W, 3) each
    write_paired_shards("data/LOL/our485", "lowlight", "data/lol_shards", crop_size=256)

Shards of pairs store the target in `image` and the input in `input`, both cut at the same window
(gan_core.data.shards); `load_shard_images` and `decode_example` give the (H, W, 6) stack back.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from gan_core.data.folders import scan_image_folder
from gan_core.data.images import ImageDecodeError, encode_png, load_image
from gan_core.data.shards import ShardReport, check_tiling, commit_rows, tile_rows, too_small_reason

PAIR_LAYOUTS = {"denoise": ("noisy", "clean"), "lowlight": ("low", "high"), "fusion": ("ir", "vi")}
"""task -> (input sub-folder, target sub-folder)."""

_LAYOUT_HINTS = {
    "denoise": "noisy and clean versions of each image",
    "lowlight": "the LOL layout: LOL/our485 or LOL/eval15",
    "fusion": "TNO / RoadScene / LLVIP / M3FD layout: rename or link their infrared and visible folders to ir and vi",
}

GRAY_MAX_CHANNEL_DIFF = 8
GRAY_MEAN_CHANNEL_DIFF = 1.0
"""An infrared image stored as RGB counts as gray when |R - G| and |G - B| stay within
GRAY_MAX_CHANNEL_DIFF at every pixel and average at most GRAY_MEAN_CHANNEL_DIFF: a gray image saved as an
RGB JPEG (as some data sets ship their infrared frames) decodes with channels a level or two apart; a
colour photo or a false-colour (palette) thermal image is far beyond both."""


class PairError(ValueError):
    """Two images that cannot form a pair: different sizes, or a colour image where infrared is expected."""


Pair = tuple[str, Path, Path]
"""(name, input file, target file); the name is the input file's path inside its sub-folder."""


def pair_folders(root: str | Path, layout: str) -> tuple[Path, Path]:
    """(root / input sub-folder, root / target sub-folder) of a layout.

    Raises:
        ValueError: layout is not in PAIR_LAYOUTS (the message lists them).
    """
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"unknown pair layout {layout!r}; valid: {', '.join(PAIR_LAYOUTS)}")
    input_name, target_name = PAIR_LAYOUTS[layout]
    return Path(root) / input_name, Path(root) / target_name


def is_paired_folder(path: str | Path, layout: str) -> bool:
    """Whether path is a folder holding both sub-folders of layout (e.g. low/ and high/ for lowlight).

    Raises:
        ValueError: layout is not in PAIR_LAYOUTS.
    """
    input_dir, target_dir = pair_folders(path, layout)
    return input_dir.is_dir() and target_dir.is_dir()


def match_pairs(root: str | Path, layout: str) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Match the files of root's two sub-folders on their relative path without extension.

    Both sub-folders are walked by scan_image_folder (recursive, hidden names skipped, symlinks followed).

    Args:
        root: the folder holding the layout's sub-folders.
        layout: a PAIR_LAYOUTS key: denoise, lowlight or fusion.

    Returns:
        (pairs, problems): pairs sorted by name; problems as (file relative to root, reason) for each
        file without partner ("no partner in vi/"), each name that two files of one sub-folder share
        (a.png and a.jpg), and each entry of the sub-folders that cannot be followed.

    Raises:
        FileNotFoundError: root lacks one of the sub-folders (the message names the expected layout).
        ValueError: unknown layout.
    """
    pairs, problems, _ = _match(root, layout)
    return pairs, problems


def _match(root: str | Path, layout: str) -> tuple[list[Pair], list[tuple[str, str]], int]:
    """match_pairs, plus the number of image files found in both sub-folders."""
    folders = pair_folders(root, layout)
    if not all(folder.is_dir() for folder in folders):
        input_dir, target_dir = folders
        raise FileNotFoundError(f"expected {input_dir} and {target_dir} with the same file names "
                                f"({_LAYOUT_HINTS[layout]})")
    problems: list[tuple[str, str]] = []
    sides = []  # per sub-folder: {relative path without extension: [relative paths]}
    for folder in folders:
        scan = scan_image_folder(folder)
        problems += [(f"{folder.name}/{name}", reason) for name, reason in scan.problems]
        by_key: dict[str, list[str]] = {}
        for path in scan.files:
            relative = path.relative_to(folder)
            by_key.setdefault(relative.with_suffix("").as_posix(), []).append(relative.as_posix())
        sides.append(by_key)
    pairs = []
    for key in sorted(set(sides[0]) | set(sides[1])):
        found = [side.get(key, []) for side in sides]
        if len(found[0]) == 1 and len(found[1]) == 1:
            pairs.append((found[0][0], folders[0] / found[0][0], folders[1] / found[1][0]))
            continue
        for side in (0, 1):
            mine, other, names, other_names = folders[side], folders[1 - side], found[side], found[1 - side]
            if len(names) > 1:
                reason = f"{len(names)} files in {mine.name}/ share the name {key}: rename all but one"
            elif not other_names:
                reason = f"no partner in {other.name}/"
            else:
                reason = f"its partner in {other.name}/ is ambiguous ({', '.join(other_names)})"
            problems += [(f"{mine.name}/{name}", reason) for name in names]
    files = sum(len(names) for side in sides for names in side.values())
    return pairs, sorted(problems), files


def stack_pair(input_img: np.ndarray, target_img: np.ndarray, name: str, *, gray_input: bool = False) -> np.ndarray:
    """Stack an input and a target image into one (H, W, 6) example.

    Args:
        input_img: uint8 (H, W, 3), the noisy / low-light / infrared image.
        target_img: uint8 (H, W, 3), the clean / normal-light / visible image.
        name: the pair's name, for error messages.
        gray_input: the input is infrared: it must be gray (see GRAY_MAX_CHANNEL_DIFF) and is returned
            as its gray level (the rounded mean of the channels) in 3 equal channels.

    Returns:
        uint8 (H, W, 6): input in channels 0..2, target in 3..5.

    Raises:
        PairError: the sizes differ (both are named), or gray_input and the input has colour.
    """
    if input_img.shape[:2] != target_img.shape[:2]:
        (h_in, w_in), (h_out, w_out) = input_img.shape[:2], target_img.shape[:2]
        raise PairError(f"{name}: the input is {w_in}x{h_in} px, the target {w_out}x{h_out} px; "
                        f"a pair needs one size")
    if gray_input:
        input_img = np.repeat(_infrared_gray(input_img, name)[..., None], 3, axis=2)
    return np.concatenate([input_img, target_img], axis=2)


def split_pair(example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input, target), each (H, W, 3), of an (H, W, 6) example (views, not copies).

    Raises:
        ValueError: example is not (H, W, 6).
    """
    if example.ndim != 3 or example.shape[2] != 6:
        raise ValueError(f"split_pair expects an (H, W, 6) example, got shape {example.shape}")
    return example[..., :3], example[..., 3:]


def load_pairs(root: str | Path, layout: str, *, gray_input: bool = False,
               ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """Decode every pair of a paired folder (match_pairs, then stack_pair).

    Args:
        root, layout: as match_pairs.
        gray_input: as stack_pair (True for fusion's infrared).

    Returns:
        (examples, problems): (name, uint8 (H, W, 6)) sorted by name; (file or name, reason) for every
        file without partner, undecodable file, pair of two sizes and colour infrared image, none of
        which is in examples.

    Raises:
        FileNotFoundError, ValueError: as match_pairs.
    """
    pairs, problems = match_pairs(root, layout)
    folders = pair_folders(root, layout)
    examples = []
    for pair in pairs:
        example = _load_pair(pair, folders, gray_input, problems)
        if example is not None:
            examples.append((pair[0], example))
    return examples, problems


def write_paired_shards(
    root: str | Path,
    layout: str,
    out_dir: str | Path,
    *,
    gray_input: bool = False,
    crop_size: int | None = None,
    step: int | None = None,
    thresh_size: int = 0,
    min_size: int = 0,
    rows_per_shard: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> ShardReport:
    """Convert every pair of a paired folder into Parquet shards: target in `image`, input in `input`.

    With the safety of write_shards: nothing in out_dir changes until every row is written, and a run
    that yields no row leaves it as it was. Sub-images are cut at the same windows from both images of a
    pair (subimage_starts), so a row's input and target are aligned pixel for pixel.

    Args:
        root, layout: as match_pairs.
        out_dir: folder for part-NNNNN.parquet; created if missing.
        gray_input: as stack_pair; the input is then stored as a gray PNG.
        crop_size, step, thresh_size, min_size, rows_per_shard: as write_shards.
        progress: called as progress(pairs_done, pairs_total) after each pair.

    Returns:
        A ShardReport: files_read counts the image files of both sub-folders; skipped holds the
        problems of load_pairs and the pairs too small to use.

    Raises:
        FileNotFoundError: root lacks a sub-folder of the layout.
        NoUsableImagesError: no pair gave a row (out_dir is unchanged).
        ValueError: unknown layout, or a size argument out of range.
    """
    step = check_tiling("write_paired_shards", crop_size, step, thresh_size, min_size, rows_per_shard)
    pairs, problems, files = _match(root, layout)
    folders = pair_folders(root, layout)
    report = ShardReport(files_read=files, skipped=problems)
    encode_input = _encode_gray_png if gray_input else encode_png

    def rows() -> Iterator[dict]:
        for done, pair in enumerate(pairs, start=1):
            example = _load_pair(pair, folders, gray_input, report.skipped)
            too_small = None if example is None else too_small_reason(*example.shape[:2], crop_size, min_size)
            if too_small:
                report.skipped.append((pair[0], too_small))
            elif example is not None:
                yield from tile_rows(example, pair[0], crop_size, step, thresh_size, encode_input=encode_input)
            if progress is not None:
                progress(done, len(pairs))

    def nothing_usable() -> str:
        if pairs:
            return f"no usable pair in {root}: {len(pairs)} pairs, all skipped"
        return (f"no pair in {root}: no file name is in both {folders[0].name}/ and {folders[1].name}/ "
                f"({files} image files)")

    return commit_rows(rows(), Path(out_dir), report, rows_per_shard=rows_per_shard, nothing_usable=nothing_usable)


def _load_pair(pair: Pair, folders: tuple[Path, Path], gray_input: bool,
               problems: list[tuple[str, str]]) -> np.ndarray | None:
    """Decode and stack one pair, or add why not to problems and return None."""
    name = pair[0]
    images = []
    for path, folder in zip(pair[1:], folders):
        try:
            images.append(load_image(path))
        except (ImageDecodeError, OSError) as error:
            problems.append((f"{folder.name}/{path.relative_to(folder).as_posix()}",
                             getattr(error, "reason", None) or str(error)))
    if len(images) < 2:
        return None
    try:
        return stack_pair(*images, name, gray_input=gray_input)
    except PairError as error:
        problems.append((name, str(error).removeprefix(f"{name}: ")))
        return None


def _infrared_gray(img: np.ndarray, name: str) -> np.ndarray:
    """The gray level (H, W) of an infrared image decoded as RGB; PairError when it has colour."""
    channels = img.astype(np.int16)
    differences = np.abs(np.stack([channels[..., 0] - channels[..., 1], channels[..., 1] - channels[..., 2]]))
    if differences.max() > GRAY_MAX_CHANNEL_DIFF or differences.mean() > GRAY_MEAN_CHANNEL_DIFF:
        raise PairError(f"{name}: the infrared image has colour (3 different channels); "
                        f"expected a single-channel IR image")
    return np.round(channels.mean(axis=2)).astype(np.uint8)


def _encode_gray_png(img: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) image whose channels are equal, as 8-bit gray (a third of the pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., 0])).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
