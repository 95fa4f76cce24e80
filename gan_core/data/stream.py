"""Training patches cut row by row, for data pipelines that stream (no image is kept after its patch is cut).

`PatchSampler` holds every HR image in memory and draws crops from one generator, so its batches depend on
the order of all earlier draws. A streaming pipeline (Ray Data in `jobs/training/stream.py`) decodes and
crops rows in many tasks, in an order nobody controls; here every row's patch is instead a pure function of
(seed, epoch, row id): the same row in the same epoch always gives the same crop, flips, jitter and LR
input, whichever task cuts it and whenever.

    pair = crop_row(png_bytes, row_id=row_key(3, 17), epoch=0, seed=0, patch_size=128, scale=4)
    lq, gt = pair  # (3, 32, 32), (3, 128, 128) float32 in [0, 1]; None when the row is unusable

The crop and the LR input are those of `PatchSampler` (`random_gt_patch`, `make_lq`), drawn from the row's
own generator instead of the sampler's.
"""

from __future__ import annotations

import numpy as np
import torch

from gan_core.data.images import ImageDecodeError, decode_image
from gan_core.data.pairs import _check_patch_args, _mix_seed, make_lq, random_gt_patch, to_chw_uint8


def row_key(file_index: int, row_index: int) -> int:
    """A row's identity from its shard file's position (in sorted order) and its row in that file."""
    return (int(file_index) << 32) | int(row_index)


def row_generator(seed: int, epoch: int, row_id: int) -> torch.Generator:
    """The CPU generator of one row's patch in one epoch: a function of (seed, epoch, row_id) only."""
    return torch.Generator().manual_seed(_mix_seed(seed, epoch, row_id >> 32, row_id & 0xFFFFFFFF))


def crop_row(
    data: bytes | np.ndarray | torch.Tensor,
    *,
    row_id: int,
    epoch: int,
    seed: int,
    patch_size: int,
    scale: int,
    hflip: bool = True,
    rot90: bool = True,
    color_jitter: float = 0.0,
    degradation: dict | None = None,
    with_lq: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """One training patch of one row: decode, random crop + flips/rotations (+ jitter), LR input.

    Args:
        data: the row's encoded image (PNG bytes from the shards), or an already decoded uint8 image.
        row_id: the row's identity (`row_key`), stable across epochs and runs.
        epoch: which visit of the row this is; each epoch gives another crop.
        seed: the run's seed (`train.seed`).
        patch_size, scale, hflip, rot90, color_jitter, degradation: as `random_patch_pair`.
        with_lq: make the LR input here; False returns (None, gt) for pipelines that degrade on the device.

    Returns:
        (lq (3, p / scale, p / scale) or None, gt (3, p, p)), float32 in [0, 1]; None when the row cannot be
        decoded or is smaller than patch_size (the caller counts and skips it, as PatchSampler does).

    Raises:
        ValueError: inconsistent sizes or unknown degradation keys.
    """
    _check_patch_args(patch_size, scale, degradation)
    try:
        image = decode_image(bytes(data), name=f"row {row_id}") if isinstance(data, (bytes, bytearray, memoryview)) else data
    except ImageDecodeError:
        return None
    hr = to_chw_uint8(image)  # (3, H, W) uint8
    if min(hr.shape[1:]) < patch_size:
        return None
    generator = row_generator(seed, epoch, row_id)
    gt = random_gt_patch(hr, patch_size=patch_size, scale=scale, hflip=hflip, rot90=rot90,
                         color_jitter=color_jitter, generator=generator)  # (3, p, p)
    if not with_lq:
        return None, gt
    return make_lq(gt.unsqueeze(0), scale, degradation, generator)[0], gt


def crop_rows(images: list, row_ids: list[int], epochs: list[int], **patch_args) -> dict[str, np.ndarray]:
    """`crop_row` over a batch of rows, as numpy columns; unusable rows are left out.

    Args:
        images, row_ids, epochs: one entry per row.
        patch_args: the keyword arguments of `crop_row` other than row_id and epoch.

    Returns:
        {"gt": (N, 3, p, p), "lq": (N, 3, p/s, p/s) unless with_lq is False, "row_id": (N,) int64,
        "epoch": (N,) int64, "kept": (N,) int64 indices of the input rows that gave a patch}, N <= len(images).
    """
    with_lq = patch_args.get("with_lq", True)
    patch, lr = patch_args["patch_size"], patch_args["patch_size"] // patch_args["scale"]
    lqs, gts, kept = [], [], []
    for index, (data, row_id, epoch) in enumerate(zip(images, row_ids, epochs)):
        pair = crop_row(data, row_id=int(row_id), epoch=int(epoch), **patch_args)
        if pair is None:
            continue
        lqs.append(pair[0])
        gts.append(pair[1])
        kept.append(index)
    columns = {
        "gt": torch.stack(gts).numpy() if gts else np.zeros((0, 3, patch, patch), np.float32),
        "row_id": np.asarray([row_ids[i] for i in kept], np.int64),
        "epoch": np.asarray([epochs[i] for i in kept], np.int64),
        "kept": np.asarray(kept, np.int64),
    }
    if with_lq:
        columns["lq"] = torch.stack(lqs).numpy() if lqs else np.zeros((0, 3, lr, lr), np.float32)
    return columns
