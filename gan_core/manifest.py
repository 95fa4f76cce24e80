"""Complete checkpoints: per-worker manifests, and a run's newest complete checkpoint folder.

Every worker writes its files into a local folder, then, last, a manifest of their sizes and SHA-256
(`write_manifest`); Ray Train copies the workers' folders into one storage folder in no order we control,
and a copy cut short (a full disk, a killed worker) leaves a folder whose files do not match its manifests
(`checkpoint_problem` says how). `latest_complete_checkpoint` is the one place that picks a run's
checkpoint: the newest complete one, skipping (and naming) newer broken ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from gan_core.checkpoint import CHECKPOINT_FILE
from gan_core.files import atomic_write

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gan_core/manifest/1"
# Where Ray Train (2.60, Train V2) lists a run's registered checkpoints, in the run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME; a test compares the two).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


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
