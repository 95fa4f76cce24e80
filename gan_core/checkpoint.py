"""Self-describing checkpoints: models, optimizers, schedulers, step, RNG states and the resolved config.

One file, `checkpoint.pt`, written atomically (temp file, fsync, rename), read with
`torch.load(weights_only=True)` so that loading a checkpoint never runs pickled code.
`gan_core.models.load_generator` reads the same file to get an inference-ready generator.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gan_core.config import Config, config_from_dict
from gan_core.step import TrainState, unwrap

CHECKPOINT_FORMAT = "gan_core/1"
CHECKPOINT_FILE = "checkpoint.pt"


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU and CUDA), in weights_only-safe types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: TrainState, cfg: Config, extra: dict[str, Any] | None = None) -> Path:
    """Write everything needed to continue training bit for bit.

    Args:
        path: a directory (the file goes in as `checkpoint.pt`) or a file path.
        state: the run's models and optimizers (DDP/compiled wrappers are unwrapped).
        cfg: the resolved config, stored as plain data.
        extra: more weights_only-safe data, e.g. the patch sampler's state or the MLflow run id.

    Returns:
        The path of the written file.
    """
    path = Path(path)
    target = path / CHECKPOINT_FILE if path.suffix != ".pt" else path
    target.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "step": state.step,
        "generator": unwrap(state.generator).state_dict(),
        "g_optimizer": state.g_optimizer.state_dict(),
        "g_scheduler": state.g_scheduler.state_dict(),
        "generator_ema": state.generator_ema.state_dict() if state.generator_ema is not None else None,
        "discriminator": unwrap(state.discriminator).state_dict() if state.discriminator is not None else None,
        "d_optimizer": state.d_optimizer.state_dict() if state.d_optimizer is not None else None,
        "d_scheduler": state.d_scheduler.state_dict() if state.d_scheduler is not None else None,
        "rng": capture_rng(),
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)  # atomic: a reader sees the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the one inside a directory) as a dict, checking its format.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: the file is not a gan_core checkpoint.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    payload = torch.load(file, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{file} is not a {CHECKPOINT_FORMAT} checkpoint (found {found})")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    """The Config a checkpoint was trained with."""
    return config_from_dict(payload["config"], source="checkpoint config")


def load_checkpoint(path: str | Path, state: TrainState, restore_rng_state: bool = True) -> dict[str, Any]:
    """Restore `state` in place from a checkpoint; return the checkpoint's `extra` dict.

    Raises:
        ValueError: the checkpoint lacks a network that `state` has (e.g. resuming a GAN run
            from a pixel-only checkpoint should use `train.init_from` instead).
    """
    device = next(unwrap(state.generator).parameters()).device
    payload = read_checkpoint(path, map_location=device)
    unwrap(state.generator).load_state_dict(payload["generator"])
    state.g_optimizer.load_state_dict(payload["g_optimizer"])
    state.g_scheduler.load_state_dict(payload["g_scheduler"])
    if state.generator_ema is not None:
        state.generator_ema.load_state_dict(payload["generator_ema"] or payload["generator"])
    if state.discriminator is not None:
        if payload["discriminator"] is None:
            raise ValueError(f"{path} holds no discriminator; start the GAN run with train.init_from={path}")
        unwrap(state.discriminator).load_state_dict(payload["discriminator"])
        state.d_optimizer.load_state_dict(payload["d_optimizer"])
        state.d_scheduler.load_state_dict(payload["d_scheduler"])
    state.step = int(payload["step"])
    if restore_rng_state:
        restore_rng(payload["rng"])
    return payload["extra"]


def _as_tuple(value: Any) -> Any:
    # weights_only loading turns tuples into lists in some torch versions; random.setstate wants tuples.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def export_generator(checkpoint: str | Path, out_file: str | Path, use_ema: bool = True) -> Path:
    """Write an inference-only checkpoint (config + one generator state dict) from a training checkpoint.

    `gan_core.models.load_generator` reads the result; it is a fraction of the training checkpoint's size.
    """
    payload = read_checkpoint(checkpoint)
    weights = payload["generator_ema"] if use_ema and payload["generator_ema"] is not None else payload["generator"]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    slim = {"format": CHECKPOINT_FORMAT, "config": payload["config"], "step": payload["step"],
            "generator": weights, "generator_ema": None}
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    torch.save(slim, tmp)
    os.replace(tmp, out_file)
    return out_file
