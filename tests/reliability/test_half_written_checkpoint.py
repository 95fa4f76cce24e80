"""A half-written checkpoint must not poison the jobs that read the run afterwards.

With `run.storage_path` on a full disk, Ray Train's copy of the next checkpoint dies part-way and leaves a
`checkpoint_*` folder of cut-off and empty files, newer than every good one. Here the real training loop
runs in-process and its `report` hook does what Ray Train 2.60 does with each checkpoint, with Ray's own
code: copy the folder (`StorageContext.persist_current_checkpoint`, pyarrow's copy_files), then register
it (`CheckpointManager`: `checkpoint_manager_snapshot.json`, num_to_keep). Every way a job names the run
(`--model <run folder>`, `--model <checkpoint folder>`, `runs:/<id>` through its checkpoint_location tag)
must then land on the last complete checkpoint, or say clearly what is missing.
"""

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gan_core.checkpoint import CHECKPOINT_FILE, load_generator
from gan_core.loop import Hooks, checkpointer, fit, make_sampler, setup_state
from gan_core.manifest import (
    RAY_SNAPSHOT_FILE,
    IncompleteCheckpointWarning,
    checkpoint_problem,
    latest_complete_checkpoint,
)
from jobs.cli import JobError
from jobs.tracking.model_source import local_checkpoint_file, resolve_model, run_generator
from tests.gan_core.conftest import random_rgb, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared with other tests, as in tests/gan_core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config():
    # Three checkpoints: steps 2, 4 and 6.
    return tiny_config(train={"total_steps": 6, "pretrain_steps": 2, "log_every": 2, "val_every": 2, "ckpt_every": 2})


class RayStorage:
    """Ray Train's side of `ray.train.report(metrics, checkpoint)`, run in this process."""

    def __init__(self, storage_path: Path, name: str, num_to_keep: int = 3):
        from ray.train import CheckpointConfig
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
        from ray.train.v2._internal.execution.storage import StorageContext

        self.storage = StorageContext(str(storage_path), name)
        self.run_folder = Path(self.storage.experiment_fs_path)
        self.events = asyncio.new_event_loop()  # the manager notifies its listeners through asyncio tasks
        self.manager = CheckpointManager(CheckpointConfig(num_to_keep=num_to_keep), self.storage)
        self.reported: list[str] = []  # checkpoint folder names, in report order, the failed copy's too

    def report(self, metrics: dict, directory: Path) -> str:
        from ray.train import Checkpoint
        from ray.train.v2._internal.execution.training_report import _TrainingReport

        name = self.storage.make_default_checkpoint_dir_name()  # checkpoint_<date>_<time>.<microseconds>
        self.reported.append(name)
        persisted = self.storage.persist_current_checkpoint(Checkpoint.from_directory(str(directory)), name)

        async def register():
            self.manager.register_checkpoint(_TrainingReport(persisted, metrics, validation=False))
            await asyncio.sleep(0)

        self.events.run_until_complete(register())
        return name

    def close(self) -> None:
        self.events.close()


def train_through_ray(storage_path: Path, after_report=lambda ray_storage: None,
                      ) -> tuple[RayStorage, dict[str, dict[str, torch.Tensor]]]:
    """The real loop, 6 steps, checkpointed by the real hook through Ray's copy; returns Ray's side and the
    EMA generator weights of each checkpoint that was copied. Exceptions of the copy propagate, as they
    would out of `ray.train.report`; `after_report(ray_storage)` runs after each copy that succeeded."""
    cfg = _config()
    state = setup_state(cfg, CPU)
    sampler = make_sampler(cfg, [random_rgb(48, 56, seed=i) for i in range(3)])
    ray_storage = RayStorage(storage_path, "poisoned")
    weights = {}

    def report(metrics, directory):
        if directory is not None:
            name = ray_storage.report(metrics, directory)
            weights[name] = {key: value.clone() for key, value in state.generator_ema.state_dict().items()}
            after_report(ray_storage)

    try:
        fit(state, iter(sampler), cfg, Hooks(checkpoint=checkpointer(state, cfg, sampler), report=report))
    finally:
        ray_storage.close()
    return ray_storage, weights


def _assert_generator(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_generator(path).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_snapshot_file_name_is_rays():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert RAY_SNAPSHOT_FILE == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def test_cut_off_checkpoint_is_skipped_by_every_reader(tmp_path, capsys):
    ray_storage, weights = train_through_ray(tmp_path / "storage")
    run = ray_storage.run_folder
    first, previous, newest = ray_storage.reported
    assert (run / RAY_SNAPSHOT_FILE).is_file() and all(checkpoint_problem(run / name) is None for name in weights)
    # What a full disk leaves: the newest copy cut off (Ray had registered it, the storage lost the tail),
    # and a later copy that died at its first file, which Ray never registered.
    (run / newest / CHECKPOINT_FILE).write_bytes((run / newest / CHECKPOINT_FILE).read_bytes()[:16])
    (run / newest / "sampler_rank0.pt").write_bytes(b"")
    dead = run / "checkpoint_9999-12-31_23-59-59.999999"
    dead.mkdir()
    (dead / CHECKPOINT_FILE).write_bytes(b"")
    # The newest folder by name is what every job used to load: the poison.
    with pytest.raises(ValueError, match=r"not a torch.save file \(EOFError"):
        load_generator(dead)

    with pytest.warns(IncompleteCheckpointWarning) as caught:
        assert latest_complete_checkpoint(run) == run / previous
    lines = sorted(str(warning.message) for warning in caught)
    assert len(lines) == 2
    assert lines[0].startswith(f"skipping checkpoint {dead}, which {RAY_SNAPSHOT_FILE} does not list "
                               "(checkpoint.pt is empty (0 bytes))")
    assert lines[1].startswith(f"skipping incomplete checkpoint {run / newest} (checkpoint.pt has 16 bytes, "
                               "manifest.json says ")

    # --model <run folder> and the storage folder above it: the previous checkpoint, one line per skipped folder.
    for given in (run, run.parent):
        assert local_checkpoint_file(given) == run / previous / CHECKPOINT_FILE
        said = capsys.readouterr().err.splitlines()
        assert len(said) == 2 and str(run / newest) in said[0] + said[1] and str(dead) in said[0] + said[1]
    _assert_generator(resolve_model(str(run), tmp_path / "download").path, weights[previous])

    # --model <an incomplete checkpoint folder>: what is wrong with it, not EOFError.
    with pytest.raises(JobError, match=r"incomplete checkpoint \(checkpoint.pt has 16 bytes, manifest.json says \d+; "
                                       r"sampler_rank0.pt has 0 bytes, manifest.json says \d+\)"):
        resolve_model(str(run / newest), tmp_path / "download")
    with pytest.raises(JobError, match=r"incomplete checkpoint \(checkpoint.pt is empty \(0 bytes\)\)"):
        resolve_model(str(dead), tmp_path / "download")
    assert resolve_model(str(run / first), tmp_path / "download").path == run / first / CHECKPOINT_FILE

    # runs:/<id>: jobs.train tags the run folder, finish_run the final checkpoint folder.
    for location in (run, run / newest):
        mlflow_run = SimpleNamespace(info=SimpleNamespace(run_id="abc123"),
                                     data=SimpleNamespace(tags={"checkpoint_location": str(location)}))
        source = run_generator(mlflow_run, tmp_path / "download")
        assert source.path == run / previous / CHECKPOINT_FILE and source.run_id == "abc123"
        _assert_generator(source.path, weights[previous])
    assert f"checkpoint_location {run / newest} is incomplete; using {run / previous}" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A fresh 64 MiB tmpfs; skips where mounting is not allowed (it needs root, or CAP_SYS_ADMIN)."""
    point = tmp_path / "disk"
    point.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full file system needs a tmpfs mount: Linux and root only")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the truncation test covers the rest")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_disk_during_the_copy_leaves_the_previous_checkpoint_in_use(small_disk):
    def fill_the_disk(ray_storage):
        # After the second checkpoint, the disk keeps room for half of one more: the third copy dies part-way.
        if len(ray_storage.reported) == 2:
            last = ray_storage.run_folder / ray_storage.reported[1]
            folder_bytes = sum(file.stat().st_size for file in last.iterdir())
            size = shutil.disk_usage(small_disk).used + folder_bytes // 2
            subprocess.run(["mount", "-o", f"remount,size={size}", str(small_disk)], check=True)

    with pytest.raises(OSError, match="No space left on device"):
        train_through_ray(small_disk / "storage", after_report=fill_the_disk)
    run = small_disk / "storage" / "poisoned"
    written = sorted(path.name for path in run.glob("checkpoint_*") if path.is_dir())
    assert len(written) == 3  # the third copy started, and failed
    _, previous, cut_off = written
    assert checkpoint_problem(run / previous) is None and checkpoint_problem(run / cut_off) is not None

    said = []
    assert latest_complete_checkpoint(run, warn=said.append) == run / previous
    assert len(said) == 1 and str(run / cut_off) in said[0]
    assert local_checkpoint_file(run) == run / previous / CHECKPOINT_FILE
    assert load_generator(run / previous).scale == _config().generator.scale
    with pytest.raises(JobError, match="incomplete checkpoint"):
        local_checkpoint_file(run / cut_off)
