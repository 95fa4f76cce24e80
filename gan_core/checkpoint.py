"""Every file a run writes and reads back: training checkpoints, per-worker sampler states, generator files.

- A training checkpoint is one file, `checkpoint.pt`: models, optimizers, schedulers, step, RNG states and
  the resolved config. Each DDP worker adds `sampler_rank<N>.pt` next to it (its patch sampler's position).
- A generator file holds one set of generator weights and the config that rebuilds the network
  (`{"generator": {"name": "rrdb", ...every constructor argument}}`): what inference, export, the
  registry and `train.init_from` read. `save_generator` and `export_generator` write one.
- `load_generator` reads a generator from either of ours, or from a BasicSR / Real-ESRGAN `.pth`.
- A checkpoint folder is complete when its manifests check out (`write_manifest`, `checkpoint_problem`):
  every worker writes its files into a local folder, then, last, a manifest of their sizes and SHA-256;
  Ray Train copies the workers' folders into one storage folder, and a copy cut short (a full disk, a
  killed worker) leaves a folder whose files do not match. `latest_complete_checkpoint` is the one place
  that picks a run's checkpoint: the newest complete one, skipping (and naming) newer broken ones.

Every write is atomic (`gan_core.files`), every read `torch.load(weights_only=True)`: loading a file never
runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gan_core.config import Config, config_from_dict
from gan_core.files import atomic_torch_save, atomic_write
from gan_core.models import RRDBNet, build_generator, generator_config
from gan_core.models.basicsr import pick_state_dict, rrdb_kwargs_from_state_dict, strip_wrapper_prefixes
from gan_core.step import TrainState, unwrap

CHECKPOINT_FORMAT = "gan_core/1"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gan_core/manifest/1"
# Where Ray Train (2.60, Train V2) lists a run's registered checkpoints, in the run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME; a test compares the two).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

_EXPECTED = (
    f"expected a {CHECKPOINT_FORMAT!r} checkpoint or generator file (a dict with 'format', 'config', "
    "'generator') or a BasicSR RRDBNet state dict (plain, or under 'params_ema' / 'params')"
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


# -- complete checkpoints ----------------------------------------------------------
#
# Why a manifest per worker, with sizes and hashes, rather than one marker file written last: each
# worker writes into its own local folder and Ray Train copies all of them into one storage folder, in
# an order we do not control (files of one folder may be copied in any order, workers at once). A file
# that is merely present says nothing; a manifest that lists the bytes every file must have does, in any
# copy order. Rank 0's `manifest.json` also names the world size, so a worker whose files never arrived
# is noticed too. Checking SHA-256, not only sizes, also catches a file of the right size whose blocks
# were never written (a crash after the copy, before the storage flushed).


class IncompleteCheckpointWarning(UserWarning):
    """`latest_complete_checkpoint` skipped a newer checkpoint folder; the message says which and why."""


def manifest_file(directory: str | Path, rank: int) -> Path:
    """Where worker `rank` lists its files inside a checkpoint folder: `manifest.json` for rank 0 (it also
    names the world size), `manifest_rank<N>.json` for the others."""
    return Path(directory) / (MANIFEST_FILE if rank == 0 else f"manifest_rank{rank}.json")


def write_manifest(directory: str | Path, files: Iterable[str | Path], *, rank: int = 0,
                   world_size: int = 1) -> Path:
    """Write worker `rank`'s manifest into a checkpoint folder: each file's byte size and SHA-256.

    Call it last, once `files` are written: the folder counts as complete only when every worker's
    manifest is there and every file it lists matches (`checkpoint_problem`).

    Args:
        directory: the checkpoint folder.
        files: what this worker wrote into `directory` (paths inside it, or bare names).
        rank: this worker's rank; rank 0 writes `manifest.json`, the others `manifest_rank<N>.json`.
        world_size: how many workers write into the folder (recorded by rank 0).

    Returns:
        The manifest's path.

    Raises:
        ValueError: a file is not directly inside `directory`, or rank / world_size are inconsistent.
        FileNotFoundError: a listed file does not exist.
    """
    directory = Path(directory)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} workers")
    entries: dict[str, dict[str, Any]] = {}
    for file in files:
        file = Path(file)
        if file.parent != Path(".") and file.parent.resolve() != directory.resolve():
            raise ValueError(f"{file} is not directly inside the checkpoint folder {directory}")
        entries[file.name] = {"bytes": (directory / file.name).stat().st_size,
                              "sha256": _sha256(directory / file.name)}
    manifest = {"format": MANIFEST_FORMAT, "rank": rank, "files": entries}
    if rank == 0:
        manifest["world_size"] = world_size
    text = json.dumps(manifest, indent=1, sort_keys=True)
    return atomic_write(manifest_file(directory, rank), lambda handle: handle.write(text.encode()))


def is_checkpoint_folder(directory: str | Path) -> bool:
    """True when `directory` holds any file the checkpoint hook writes (complete or not): a checkpoint
    folder rather than a run folder of checkpoint folders."""
    directory = Path(directory)
    return directory.is_dir() and ((directory / CHECKPOINT_FILE).exists()
                                   or any(directory.glob("manifest*.json")) or any(directory.glob("sampler_rank*.pt")))


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why a checkpoint folder is not complete, in words; None when it is.

    With manifests: `manifest.json` parses, so does `manifest_rank<N>.json` of every other worker it
    counts, and every file they list exists with the listed size and SHA-256. Without any (checkpoints
    written before manifests existed): `checkpoint.pt` and every `sampler_rank<N>.pt` present load with
    `torch.load(weights_only=True)`, which reads them whole.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"no folder at {directory}"
    if not any(directory.glob("manifest*.json")):
        return _problem_without_manifest(directory)
    head, problem = _read_manifest(directory, 0)
    if head is None:
        return problem
    problems = [] if CHECKPOINT_FILE in head["files"] else [f"{MANIFEST_FILE} lists no {CHECKPOINT_FILE}"]
    manifests = [head]
    for rank in range(1, head["world_size"]):
        manifest, problem = _read_manifest(directory, rank)
        if manifest is None:
            problems.append(problem)
        else:
            manifests.append(manifest)
    for manifest in manifests:
        listed_in = manifest_file(directory, manifest["rank"]).name
        for name, entry in manifest["files"].items():
            file = directory / name
            if not file.is_file():
                problems.append(f"{name} is missing ({listed_in} lists it)")
            elif file.stat().st_size != entry["bytes"]:
                problems.append(f"{name} has {file.stat().st_size} bytes, {listed_in} says {entry['bytes']}")
            elif _sha256(file) != entry["sha256"]:
                problems.append(f"{name} does not match its SHA-256 in {listed_in}")
    return "; ".join(problems) or None


def is_complete_checkpoint(directory: str | Path) -> bool:
    """True when `checkpoint_problem(directory)` finds nothing wrong."""
    return checkpoint_problem(directory) is None


def latest_complete_checkpoint(run_folder: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """The newest complete `checkpoint_*` folder of a Ray Train run folder (at any depth below it).

    Newest means: first the folders Ray Train's checkpoint manager lists in the run folder's
    `checkpoint_manager_snapshot.json` (what a resumed run would restart from), then any other; each
    group by name (Ray names them `checkpoint_<date>_<time>` or `checkpoint_<index>`, both in the order
    they were written). Every candidate is checked with `checkpoint_problem`, those the snapshot lists too:
    the snapshot says a copy was reported, not that its files are still whole.

    Args:
        run_folder: the run's storage folder (`<run.storage_path>/<run name>`) or a folder above it.
        warn: gets one line per newer folder that was skipped, naming it and why; by default
            `warnings.warn(line, IncompleteCheckpointWarning)`.

    Returns:
        The checkpoint folder.

    Raises:
        FileNotFoundError: no checkpoint_* folder holding a checkpoint, or none of them is complete (the
            message lists why).
    """
    run_folder = Path(run_folder)
    say = warn or (lambda line: warnings.warn(line, IncompleteCheckpointWarning, stacklevel=3))
    if not run_folder.is_dir():
        raise FileNotFoundError(f"no folder at {run_folder}")
    # Only folders holding something a checkpoint hook writes: Ray's checkpoint_* folders that a copy left
    # empty say nothing, and neither do other tools' checkpoint_* folders.
    folders = [path for path in run_folder.rglob("checkpoint_*") if is_checkpoint_folder(path)]
    if not folders:
        raise FileNotFoundError(f"{run_folder} holds no {CHECKPOINT_FILE}: no checkpoint_* folder below it holds "
                                "a checkpoint")
    snapshot_names = {parent: _ray_snapshot_names(parent, say) for parent in {folder.parent for folder in folders}}

    def in_snapshot(folder: Path) -> bool:
        return folder.name in (snapshot_names[folder.parent] or ())

    candidates = sorted(folders, key=lambda folder: (in_snapshot(folder), _name_order(folder.name)), reverse=True)
    skipped: list[tuple[Path, str]] = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            break
        skipped.append((folder, problem))
    else:
        reasons = "; ".join(f"{folder.name}: {problem}" for folder, problem in skipped)
        raise FileNotFoundError(f"no complete checkpoint under {run_folder} ({reasons})")
    chosen = folder
    for folder, problem in skipped:
        say(f"skipping incomplete checkpoint {folder} ({problem}); using {chosen}")
    # Newer folders that the snapshot does not list were never visited: name them too.
    seen = {folder for folder, _ in skipped} | {chosen}
    for folder in candidates:
        if folder not in seen and folder.parent == chosen.parent and _name_order(folder.name) > _name_order(chosen.name):
            problem = checkpoint_problem(folder) or "complete, but its report to Ray Train did not finish"
            say(f"skipping checkpoint {folder}, which {RAY_SNAPSHOT_FILE} does not list ({problem}); using {chosen}")
    return chosen


def _read_manifest(directory: Path, rank: int) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "") when worker `rank`'s manifest is well formed, else (None, why not)."""
    file = manifest_file(directory, rank)
    if not file.is_file():
        whose = "" if rank == 0 else f" (worker {rank}'s files did not arrive)"
        return None, f"{file.name} is missing{whose}"
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{file.name} is not valid JSON ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"{file.name} is not a {MANIFEST_FORMAT} manifest"
    files = manifest.get("files")
    entries_ok = isinstance(files, dict) and all(
        _is_plain_name(name) and isinstance(entry, dict) and type(entry.get("bytes")) is int
        and isinstance(entry.get("sha256"), str) for name, entry in files.items())
    world_ok = rank != 0 or (type(manifest.get("world_size")) is int and manifest["world_size"] >= 1)
    if manifest.get("rank") != rank or not entries_ok or not world_ok:
        expected = f"rank {rank}, files {{name: {{bytes, sha256}}}}" + (", world_size" if rank == 0 else "")
        return None, f"{file.name} is malformed (expected {expected})"
    return manifest, ""


def _is_plain_name(name: object) -> bool:
    # A manifest names files of its own folder only: never a path that leads elsewhere.
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _problem_without_manifest(directory: Path) -> str | None:
    """Completeness of a folder written before manifests: its files load."""
    checkpoint = directory / CHECKPOINT_FILE
    if not checkpoint.is_file():
        return f"no {CHECKPOINT_FILE} (and no {MANIFEST_FILE})"
    for file in [checkpoint, *sorted(directory.glob("sampler_rank*.pt"))]:
        if file.stat().st_size == 0:
            return f"{file.name} is empty (0 bytes)"
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a cut-off file fails in many ways (EOFError, RuntimeError ...)
            first_line = (str(err).splitlines() or [""])[0]
            return f"{file.name} does not load ({type(err).__name__}: {first_line})"
    return None


def _ray_snapshot_names(run_folder: Path, say: Callable[[str], None]) -> set[str] | None:
    """The checkpoint folder names Ray Train's snapshot in `run_folder` lists; None without a readable one."""
    file = run_folder / RAY_SNAPSHOT_FILE
    if not file.is_file():
        return None
    try:
        snapshot = json.loads(file.read_bytes())
        results = list(snapshot["checkpoint_results"])
        if snapshot.get("latest_checkpoint_result"):
            results.append(snapshot["latest_checkpoint_result"])
        return {str(result["checkpoint_dir_name"]) for result in results}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        # Ray rewrites it in place after every report: a full disk can cut it short too.
        say(f"ignoring {file}, which does not parse ({type(err).__name__}: {err}); ordering checkpoints by name")
        return None


def _name_order(name: str) -> tuple[int, int, str]:
    # checkpoint_000012 by its number (unpadded indices too), checkpoint_<date>_<time> by its text.
    suffix = name.removeprefix("checkpoint_")
    return (1, int(suffix), name) if re.fullmatch(r"\d+", suffix) else (0, 0, name)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- generator files -------------------------------------------------------------


def save_generator(path: str | Path, generator: nn.Module, step: int = 0) -> Path:
    """Write `generator` as a generator file: its weights and the config that rebuilds it, every option included.

    Args:
        path: the file to write.
        generator: a generator of `gan_core.models.GENERATORS` (wrappers are unwrapped).
        step: the training step the weights come from (0 for imported weights).

    Returns:
        The written path.
    """
    model = unwrap(generator)
    return _write_generator_file(path, generator_config(model), model.state_dict(), step)


def export_generator(checkpoint: str | Path, out_file: str | Path, use_ema: bool = True) -> Path:
    """Reduce a training checkpoint to a generator file (the EMA weights when present and `use_ema`).

    A fraction of the training checkpoint's size: no discriminator, optimizer states or RNG.
    """
    payload = read_checkpoint(checkpoint)
    weights = payload["generator_ema"] if use_ema and payload.get("generator_ema") is not None else payload["generator"]
    return _write_generator_file(out_file, payload["config"]["generator"], weights, int(payload["step"]))


def _write_generator_file(path: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                          step: int) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "config": {"generator": dict(config)}, "step": step,
               "generator": weights, "generator_ema": None}
    return atomic_torch_save(payload, path)


def load_generator(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> nn.Module:
    """Load a generator in eval mode from a training checkpoint, a generator file or a BasicSR `.pth`.

    Args:
        path: our `checkpoint.pt` (or a directory holding one), a generator file, or a BasicSR-format
            `.pth` (RRDBNet weights, plain or under "params_ema" / "params"; "module." and "_orig_mod."
            prefixes are stripped; the architecture is read from the shapes, res_scale is BasicSR's 0.2).
        device: where to put the weights.
        use_ema: prefer the EMA weights ("generator_ema" / "params_ema") when the file has them.

    Returns:
        The generator on `device`, in eval mode, with its weights loaded strictly.

    Raises:
        FileNotFoundError: the path (or `<dir>/checkpoint.pt`) does not exist.
        ValueError: the file is neither format; the message shows what it found and what was expected.
    """
    file = _resolve_file(path)
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
        model = build_generator(**generator_cfg)
    else:
        weights = pick_state_dict(obj, use_ema)
        if weights is None:
            raise ValueError(f"{file}: found {_describe(obj)}; {_EXPECTED}")
        try:
            model = RRDBNet(**rrdb_kwargs_from_state_dict(weights))
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err
    try:
        model.load_state_dict(strip_wrapper_prefixes(weights), strict=True)
    except RuntimeError as err:  # missing/unexpected keys or wrong shapes: the file does not match its config
        raise ValueError(f"{file}: weights do not match {type(model).__name__}: {err}") from err
    return model.to(device).eval()


# -- reading files ----------------------------------------------------------------


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint or generator file at {file}")
    return file


def _torch_load(file: Path, map_location: str | torch.device) -> object:
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
