"""Every file a run writes and reads back: training checkpoints, per-worker sampler states, generator files.

- A training checkpoint is one file, `checkpoint.pt`: models, optimizers, schedulers, step, RNG states and
  the resolved config. Each DDP worker adds `sampler_rank<N>.pt` next to it (its patch sampler's position).
- A generator file holds one set of generator weights and the config that rebuilds the network
  (`{"generator": {"name": "rrdb", ...every constructor argument}}`): what inference, export, the
  registry and `train.init_from` read. `save_generator` and `export_generator` write one.
- `load_generator` reads a generator from either of ours, from a `.safetensors` file (`gan_core.portable`), or
  from a BasicSR / Real-ESRGAN `.pth`; plain weights need the caller to say what they cannot tell (`arch`).
- Which checkpoint folders are complete, and a run's newest complete one: `gan_core.manifest`.

Every write is atomic (`gan_core.files`), every read `torch.load(weights_only=True)`: loading a file never
runs pickled code.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gan_core.config import Config, config_from_dict
from gan_core.files import atomic_torch_save
from gan_core.models import RRDBNet, build_generator, generator_config
from gan_core.models.basicsr import (
    pick_state_dict,
    rrdb_kwargs_from_state_dict,
    strip_wrapper_prefixes,
)
from gan_core.portable import ARCH_HELP, FORMAT, parse_arch, read_safetensors
from gan_core.step import TrainState, unwrap
from gan_core.task_config import TaskSection

CHECKPOINT_FORMAT = FORMAT
CHECKPOINT_FILE = "checkpoint.pt"

_EXPECTED = (
    f"expected a {CHECKPOINT_FORMAT!r} checkpoint or generator file (a dict with 'format', 'config', "
    "'generator'), a .safetensors generator, or a BasicSR RRDBNet state dict (plain, or under 'params_ema' / "
    "'params')"
)


# -- RNG ----------------------------------------------------------------------


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


def _as_tuple(value: Any) -> Any:
    # weights_only loading turns tuples into lists in some torch versions; random.setstate wants tuples.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- training checkpoints -------------------------------------------------------


def save_checkpoint(path: str | Path, state: TrainState, cfg: Config, extra: dict[str, Any] | None = None) -> Path:
    """Write everything needed to continue training bit for bit.

    Args:
        path: a directory (the file goes in as `checkpoint.pt`) or a file path.
        state: the run's models and optimizers (DDP/compiled wrappers are unwrapped).
        cfg: the resolved config, stored as plain data.
        extra: more weights_only-safe data that belongs to the run, e.g. its MLflow run id.

    Returns:
        The path of the written file.
    """
    path = Path(path)
    target = path / CHECKPOINT_FILE if path.suffix != ".pt" else path
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
    return atomic_torch_save(payload, target)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint or generator file (or the `checkpoint.pt` inside a directory) as a dict.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: the file is not a gan_core checkpoint.
    """
    file = _resolve_file(path)
    payload = _torch_load(file, map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not a {CHECKPOINT_FORMAT} checkpoint (found {_describe(payload)})")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    """The Config a training checkpoint was written with."""
    return config_from_dict(payload["config"], source="checkpoint config")


def load_checkpoint(path: str | Path, state: TrainState, restore_rng_state: bool = True) -> dict[str, Any]:
    """Restore `state` in place from a training checkpoint; return the checkpoint's `extra` dict.

    Raises:
        ValueError: the checkpoint lacks a network that `state` has (e.g. resuming a GAN run
            from a pixel-only checkpoint should use `train.init_from` instead).
    """
    device = next(unwrap(state.generator).parameters()).device
    payload = read_checkpoint(path, map_location=device)
    if "g_optimizer" not in payload:
        raise ValueError(f"{path} is a generator file, not a training checkpoint; start from it with "
                         f"train.init_from={path}")
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


def sampler_file(directory: str | Path, rank: int) -> Path:
    """Where worker `rank` keeps its patch sampler's state inside a checkpoint directory."""
    return Path(directory) / f"sampler_rank{rank}.pt"


def save_sampler_state(directory: str | Path, rank: int, sampler_state: dict[str, Any]) -> Path:
    """Write one worker's sampler state next to the checkpoint (atomically)."""
    return atomic_torch_save(sampler_state, sampler_file(directory, rank))


def load_sampler_state(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """Worker `rank`'s sampler state from a checkpoint directory, or None when it has none."""
    file = sampler_file(directory, rank)
    return torch.load(file, weights_only=True) if file.is_file() else None


# -- generator files -------------------------------------------------------------


def save_generator(path: str | Path, generator: nn.Module, step: int = 0,
                   task: TaskSection | dict[str, Any] | None = None) -> Path:
    """Write `generator` as a generator file: its weights and the config that rebuilds it, every option included.

    Args:
        path: the file to write.
        generator: a generator of `gan_core.models.GENERATORS` (wrappers are unwrapped).
        step: the training step the weights come from (0 for imported weights).
        task: the task it was trained for (what `generator_task` reads back); None: the file names none, which
            reads as super-resolution.

    Returns:
        The written path.
    """
    model = unwrap(generator)
    if isinstance(task, TaskSection):
        task = task.model_dump(mode="json")
    return _write_generator_file(path, generator_config(model), model.state_dict(), step, task=task)


def export_generator(checkpoint: str | Path, out_file: str | Path, use_ema: bool = True) -> Path:
    """Reduce a training checkpoint to a generator file (the EMA weights when present and `use_ema`).

    A fraction of the training checkpoint's size: no discriminator, optimizer states or RNG.
    """
    payload = read_checkpoint(checkpoint)
    weights = payload["generator_ema"] if use_ema and payload.get("generator_ema") is not None else payload["generator"]
    return _write_generator_file(out_file, payload["config"]["generator"], weights, int(payload["step"]),
                                 task=payload["config"].get("task"))


def _write_generator_file(path: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                          step: int, task: dict[str, Any] | None = None) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "config": {"generator": dict(config)}, "step": step,
               "generator": weights, "generator_ema": None}
    if task is not None:
        payload["config"]["task"] = dict(task)
    return atomic_torch_save(payload, path)


def generator_task(path: str | Path) -> TaskSection:
    """The task a checkpoint or generator file was trained for (its config's `task` section); super-resolution for
    files that do not say (plain weights, files written before tasks existed).

    Raises:
        FileNotFoundError: nothing at `path`.
    """
    file = _resolve_file(path)
    if file.suffix == ".safetensors":
        return TaskSection()
    obj = _torch_load(file, "cpu")
    config = obj.get("config") if isinstance(obj, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    return TaskSection.model_validate(task) if isinstance(task, dict) else TaskSection()


def load_generator(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                   arch: str | dict[str, Any] | None = None) -> nn.Module:
    """Load a generator in eval mode from a training checkpoint, a generator file, a safetensors file or a
    BasicSR `.pth`.

    Our files and our safetensors carry the generator config. Plain weights (a BasicSR `.pth`, a
    safetensors file without our metadata) show channels, width, depth, growth and scale in their shapes,
    but not `res_scale` or `upsample_skip`: a model trained with res_scale 0.3 would load "fine" with 0.2
    and compute something else. So plain weights need `arch`; this function never guesses.

    Args:
        path: our `checkpoint.pt` (or a directory holding one), a generator file, a `.safetensors` file, or a
            BasicSR-format `.pth` (RRDBNet weights, plain or under "params_ema" / "params"; "module." and
            "_orig_mod." prefixes are stripped).
        device: where to put the weights.
        use_ema: prefer the EMA weights ("generator_ema" / "params_ema") when the file has them.
        arch: what plain weights cannot tell: "basicsr" (res_scale 0.2, no skip), "k=v,..." or a dict of
            generator arguments. For files that carry their config, it must agree with it (a check).

    Returns:
        The generator on `device`, in eval mode, with its weights loaded strictly.

    Raises:
        FileNotFoundError: the path (or `<dir>/checkpoint.pt`) does not exist.
        ValueError: the file is none of these formats (the message shows what it found), plain weights
            without `arch`, or an `arch` that contradicts the file.
    """
    file = _resolve_file(path)
    arch = parse_arch(arch)
    weights, generator_cfg = read_generator_weights(file, device, use_ema)
    if generator_cfg is not None:
        _check_arch_agrees(file, generator_cfg, arch)
        model = build_generator(**generator_cfg)
    else:
        model = _plain_rrdb(file, weights, arch)
    try:
        model.load_state_dict(strip_wrapper_prefixes(weights), strict=True)
    except RuntimeError as err:  # missing/unexpected keys or wrong shapes: the file does not match its config
        raise ValueError(f"{file}: weights do not match {type(model).__name__}: {err}") from err
    return model.to(device).eval()


def read_generator_weights(path: str | Path, device: str | torch.device = "cpu",
                           use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The generator weights of any file `load_generator` reads, and its generator config (None for plain
    weights), without building the network: what `train.init_from` needs.

    Raises:
        FileNotFoundError, ValueError: as `load_generator`.
    """
    file = _resolve_file(path)
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    obj = _torch_load(file, device)
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{file}: checkpoint format {obj['format']!r} is not supported; {_EXPECTED}")
        config = obj.get("config")
        generator_cfg = config.get("generator") if isinstance(config, dict) else None
        if not isinstance(generator_cfg, dict):
            raise ValueError(f"{file}: {CHECKPOINT_FORMAT} file has no config['generator']; found {_describe(obj)}")
        weights = obj.get("generator_ema") if use_ema else None
        weights = weights if weights is not None else obj.get("generator")
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"{file}: {CHECKPOINT_FORMAT} file has no 'generator' weights; found {_describe(obj)}")
        return weights, generator_cfg
    weights = pick_state_dict(obj, use_ema)
    if weights is None:
        raise ValueError(f"{file}: found {_describe(obj)}; {_EXPECTED}")
    return weights, None


def _plain_rrdb(file: Path, weights: dict[str, torch.Tensor], arch: dict[str, Any] | None) -> nn.Module:
    """The RRDBNet for plain weights: shapes give the sizes, `arch` what shapes cannot tell."""
    try:
        kwargs = rrdb_kwargs_from_state_dict(strip_wrapper_prefixes(weights))
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err
    if arch is None:
        raise ValueError(f"{file} holds plain RRDBNet weights, which do not record res_scale or upsample_skip "
                         f"(a wrong guess loads without error and computes something else); pass `arch` (the jobs' --arch): "
                         f"{ARCH_HELP}")
    for key, value in arch.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{file}: arch says {key}={value!r} but the weights' shapes say {kwargs[key]!r}")
    try:
        return RRDBNet(**{**kwargs, **arch})
    except TypeError as err:
        raise ValueError(f"{file}: arch {arch}: {err}") from err


def _check_arch_agrees(file: Path, generator_cfg: dict[str, Any], arch: dict[str, Any] | None) -> None:
    for key, value in (arch or {}).items():
        if key in generator_cfg and generator_cfg[key] != value:
            raise ValueError(f"{file} records {key}={generator_cfg[key]!r}, but arch asks for {key}={value!r}")


# -- reading files ----------------------------------------------------------------


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint or generator file at {file}")
    return file


def _torch_load(file: Path, map_location: str | torch.device) -> object:
    with open(file, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip ("PK"), older torch a pickle (protocol byte 0x80); anything else (a JSON or YAML file
    # picked by a glob) would fail deep in the unpickler with an empty reason.
    if head and not head.startswith((b"PK", b"\x80")):
        raise ValueError(f"{file} is not a torch.save file (it starts with {head!r}); {_EXPECTED}")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary pickled objects; keep torch's one-line reason, not its advice
        # to retry with weights_only=False (which would run the file's code).
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line), str(err))
        raise ValueError(f"{file} holds objects other than tensors and plain containers ({reason}); {_EXPECTED}") from err
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - arbitrary bytes fail in many ways (KeyError, EOFError, RuntimeError ...)
        raise ValueError(f"{file} is not a torch.save file ({type(err).__name__}: {err}); {_EXPECTED}") from err


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:12]]
        more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
        return f"a dict with top-level keys [{', '.join(keys)}{more}]"
    return f"an object of type {type(obj).__name__}"
