"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `target` through a temporary file in the same folder, fsync it, then rename it into place.

    Args:
        target: the file to (re)place; its parent folders are created.
        write: called once with the open binary temporary file.

    Returns:
        `target` as a Path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_torch_save(obj: Any, target: str | Path) -> Path:
    """`torch.save(obj)` to `target`, atomically."""
    return atomic_write(target, lambda handle: torch.save(obj, handle))
