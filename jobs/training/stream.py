"""`data.loader: stream`: Ray Data reads, decodes and crops; each worker takes a bounded stream of patches.

With `data.loader: memory` every worker decodes its whole shard into RAM (`worker.decode_rows`), which is
fast for small sets and impossible for big ones. Here nothing but ready patches reaches a worker:

    trainer (driver)  datasets={"train": StreamDatasetProvider(...)}     called again at every worker-group
                      start (first start, restart after a failure), so it can resume the stream
    Ray Data tasks    ray.data.range(epochs x files)                     one item per (epoch, shard file)
                      .map_batches(ReadAndCrop, num_cpus=1)              read the file's rows, decode, crop,
                                                                          LR input (gan_core.data.stream)
    each worker       get_dataset_shard("train").iter_torch_batches(batch_size, prefetch_batches)
                      -> StreamBatches -> (lq, gt) as PatchSampler yields them -> loop.fit unchanged

The tasks ask only for a CPU, so on a cluster Ray schedules them on CPU-only nodes too. What is in flight is
bounded: the patches Ray Data holds ahead of the workers by `data.stream_buffer_mb` (the ingest's object
store limit, set in `trainer.build_trainer`; past it the tasks wait and then keep pace with training), what a
worker holds by `data.prefetch_batches` ready batches. Worker memory does not grow with the data set.

Seeding. Epoch e visits every row once: the shard files in a seeded order of (seed, e), the rows of each
file in a seeded order of (seed, e, file). Row r's patch in epoch e (crop, flips, jitter, LR input) is a
function of (seed, e, r) alone (`gan_core.data.stream.crop_row`), whichever task cuts it.

Resuming, precisely. Each worker's checkpoint holds the newest epoch it has trained on and the highest
position within that epoch's row order it has trained on. At a worker-group start the provider reads those
states from the run's newest complete checkpoint (or the `resume_from` checkpoint of jobs.tune) and starts
the stream at that epoch, after the highest position any worker reached. Exact: the step counter (restored
with the models), the epoch, each epoch's row order, and the patch of every (epoch, row); no row is trained
twice within an epoch. Not exact: Ray Data's streaming split hands blocks to whichever worker asks first, so
which worker trains which row, and so the batches after a resume, differ from an uninterrupted run; rows that
were handed out but not yet trained at the checkpoint (at most about `prefetch_batches` + 1 batches per
worker, plus a block in flight) are not trained in that epoch. Rows smaller than a patch count as positions
but give no patch. A run that stores on a URI (s3://...) resumes the same way: the provider downloads the
newest complete checkpoint folder of the run to read the workers' states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gan_core.config import Config, config_from_dict
from gan_core.data.pairs import _mix_seed
from gan_core.data.stream import crop_rows, row_key

STREAM_LOADER = "stream"
MAX_BLOCKS = 256


@dataclass(frozen=True)
class StreamStart:
    """Where a stream begins: `epoch`, and the first position of that epoch's row order it yields."""

    epoch: int = 0
    position: int = 0


# -- the Ray Data side --------------------------------------------------------------------------------


def shard_file_list(path: str) -> list[str]:
    """The Parquet files of data.train, sorted: a local folder or file, or a URI (s3://...) pyarrow can list."""
    if "://" not in path:
        from gan_core.data.shards import shard_files

        return [str(file) for file in shard_files(path)]
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(path)
    scheme = path.split("://", 1)[0]
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(f"{scheme}://{info.path}" for info in infos if info.type == pafs.FileType.File
                  and info.path.endswith(".parquet") and not Path(info.path).name.startswith((".", "_")))


def row_counts(files: list[str]) -> list[int]:
    """Rows per Parquet file, from the footers (nothing else is read)."""
    import pyarrow.parquet as pq

    counts = []
    for file in files:
        if "://" in file:
            import pyarrow.fs as pafs

            filesystem, inner = pafs.FileSystem.from_uri(file)
            counts.append(pq.read_metadata(inner, filesystem=filesystem).num_rows)
        else:
            counts.append(pq.read_metadata(file).num_rows)
    return counts


def _permutation(n: int, *key: int) -> np.ndarray:
    return np.random.default_rng(_mix_seed(*key)).permutation(n)


class ReadAndCrop:
    """The Ray Data task: one (epoch, shard file) item -> that file's patches, in batches of `chunk` rows.

    Output columns: `gt` (and `lq` unless blind) float32 patches, `epoch`, and `position` (the row's place in
    its epoch's order, which the resume reads back).
    """

    def __init__(self, files: list[str], counts: list[int], patch_args: dict[str, Any], seed: int,
                 start: StreamStart, chunk: int):
        self.files, self.counts, self.patch_args, self.seed = files, counts, patch_args, seed
        self.start, self.chunk = start, chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq

        for item in batch["id"].tolist():
            epoch = self.start.epoch + item // len(self.files)
            slot = item % len(self.files)
            order = _permutation(len(self.files), self.seed, epoch)
            file_index = int(order[slot])
            offset = sum(self.counts[i] for i in order[:slot])  # rows of this epoch before this file
            rows = _permutation(self.counts[file_index], self.seed, epoch, file_index + 1)
            positions = offset + np.arange(len(rows))
            wanted = positions >= (self.start.position if epoch == self.start.epoch else 0)
            if not wanted.any():
                continue  # a file the resumed epoch has already trained on: not even read
            images = pq.read_table(self.files[file_index], columns=["image"]).column("image").to_pylist()
            rows, positions = rows[wanted], positions[wanted]
            for begin in range(0, len(rows), self.chunk):
                part = rows[begin:begin + self.chunk]
                out = crop_rows([images[r] for r in part], [row_key(file_index, r) for r in part],
                                [epoch] * len(part), seed=self.seed, **self.patch_args)
                out["position"] = positions[begin:begin + self.chunk][out.pop("kept")]
                out.pop("row_id")
                if len(out["gt"]):  # rows smaller than a patch or undecodable give none
                    yield out


def build_stream_dataset(cfg: Config, *, num_workers: int, start: StreamStart = StreamStart()):
    """The lazy Ray Dataset of ready patches for a run of `cfg` with `num_workers` workers, from `start`.

    It holds enough epochs for `train.total_steps` (twice over, for rows that give no patch); if a run still
    reaches its end, `StreamBatches` starts it again.

    Raises:
        FileNotFoundError: data.train holds no Parquet file.
    """
    import ray.data

    files = shard_file_list(cfg.data.train)
    if not files:
        raise FileNotFoundError(f"data.train={cfg.data.train} holds no Parquet shards")
    counts = row_counts(files)
    rows_per_epoch = max(sum(counts), 1)
    needed = cfg.train.total_steps * cfg.train.d_steps_per_g * cfg.data.batch_size * num_workers
    epochs = 2 * math.ceil((needed + start.position) / rows_per_epoch) + 1
    data = cfg.data
    patch_args = {"patch_size": data.patch_size, "scale": cfg.generator.scale, "hflip": data.hflip,
                  "rot90": data.rot90, "color_jitter": data.color_jitter,
                  "degradation": data.degradation.model_dump(), "with_lq": data.blind is None}
    # Output blocks of about 8 MB (at most 256 rows): small enough to keep memory bounded, big enough that the
    # per-block cost of the object store and the scheduler is paid once per many patches, not once per batch.
    patch_bytes = 4 * 3 * data.patch_size ** 2 * (1 + 1 / cfg.generator.scale ** 2)
    chunk = max(data.batch_size, min(256, int(8 * 2**20 // patch_bytes)))
    read_and_crop = ReadAndCrop(files, counts, patch_args, cfg.train.seed, start, chunk=chunk)
    items = epochs * len(files)
    # One block per (epoch, file) item up to MAX_BLOCKS: blocks are what runs in parallel; past the cap a task
    # reads several files in turn, still yielding patches as it goes. Ray Data's coordinator does work per
    # block: with 4,096 it took half a core of this 2-core machine (measured with ps), beside the training.
    return (ray.data.range(items, override_num_blocks=min(items, MAX_BLOCKS))
            .map_batches(read_and_crop, batch_size=1, num_cpus=1))


def stream_start(states: list[dict[str, Any] | None]) -> StreamStart:
    """Where to continue, from every worker's saved stream state: the newest epoch, after the highest
    position any worker trained on in it. Other states (a memory-mode sampler's, or none) give the start."""
    mine = [s for s in states if s and s.get("loader") == STREAM_LOADER and s.get("epoch", -1) >= 0]
    if not mine:
        return StreamStart()
    epoch = max(int(s["epoch"]) for s in mine)
    return StreamStart(epoch, max(int(s["next_position"]) for s in mine if int(s["epoch"]) == epoch))


def read_stream_start(directory: str | Path) -> StreamStart:
    """The StreamStart of a checkpoint folder: every `sampler_rank<N>.pt` in it."""
    from gan_core.checkpoint import load_sampler_state

    directory = Path(directory)
    ranks = sorted(int(f.stem.removeprefix("sampler_rank")) for f in directory.glob("sampler_rank*.pt"))
    return stream_start([load_sampler_state(directory, rank) for rank in ranks])


def remote_stream_start(run_uri: str) -> StreamStart | None:
    """The StreamStart of the newest complete checkpoint of a run stored on a URI (s3://...), or None when
    the run has none yet. The checkpoint folder is downloaded whole (its manifests are checked against every
    file) into a temporary folder, removed afterwards."""
    import tempfile

    from jobs.cli import JobError
    from jobs.tracking.model_source import remote_checkpoint_file

    with tempfile.TemporaryDirectory(prefix="stream-start-") as scratch:
        try:
            checkpoint = remote_checkpoint_file(run_uri, Path(scratch))
        except JobError as err:  # nothing there yet (a first start), or no complete checkpoint: a fresh stream
            reason = str(err).split(": ", 1)[-1]  # the message names the URI without its query (no keys)
            print(f"data.loader=stream: the stream starts at epoch 0 (no checkpoint of the run read: {reason})",
                  flush=True)
            return None
        return read_stream_start(checkpoint.parent)


class StreamDatasetProvider:
    """`datasets={"train": provider}`: Ray Train (V2) calls it at every worker-group start, so a rerun with
    the same name and a restart after a failure both continue the stream where the checkpoint left it."""

    def __init__(self, cfg: Config, *, num_workers: int, resume_from: Any = None):
        self.config, self.num_workers, self.resume_from = cfg.model_dump(mode="json"), num_workers, resume_from

    def __call__(self):
        cfg = config_from_dict(self.config)
        start = self.start(cfg)
        print(f"data.loader=stream: epoch {start.epoch}, from position {start.position} of its row order", flush=True)
        return build_stream_dataset(cfg, num_workers=self.num_workers, start=start)

    def start(self, cfg: Config) -> StreamStart:
        from gan_core.manifest import latest_complete_checkpoint

        if "://" not in cfg.run.storage_path:
            try:
                return read_stream_start(latest_complete_checkpoint(Path(cfg.run.storage_path) / cfg.run.name,
                                                                    warn=lambda line: None))
            except FileNotFoundError:
                pass  # no checkpoint of this run yet
        else:
            remote = remote_stream_start(f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}")
            if remote is not None:
                return remote
        if self.resume_from is not None:  # jobs.tune: a trial's last or a PBT donor's checkpoint
            with self.resume_from.as_directory() as directory:
                return read_stream_start(directory)
        return StreamStart()


# -- the worker side -----------------------------------------------------------------------------------


class StreamBatches:
    """An endless iterator of (lq, gt) batches from this worker's shard of the stream, with a state_dict
    for the checkpoint (read back by `StreamDatasetProvider`, not by this class).

    Batches are PatchSampler's: (lq (B, 3, p/s, p/s), gt (B, 3, p, p)) float32 in [0, 1] on the CPU, or
    (None, gt) with `data.blind`, whose LR input `loop.device_batches` makes on the device.
    """

    def __init__(self, shard, *, batch_size: int, prefetch_batches: int, with_lq: bool = True):
        """Args:
            shard: `ray.train.get_dataset_shard("train")`.
            batch_size: patches per batch (data.batch_size).
            prefetch_batches: ready batches buffered ahead (data.prefetch_batches).
            with_lq: False for GT-only (`data.blind`) batches, yielded as (None, gt).
        """
        self.shard, self.batch_size, self.prefetch_batches, self.with_lq = shard, batch_size, prefetch_batches, with_lq
        self.epoch, self.next_position, self.passes = -1, 0, 0

    def __iter__(self) -> Iterator:
        while True:
            for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, prefetch_batches=self.prefetch_batches,
                                                       drop_last=True):
                self._advance(batch["epoch"], batch["position"])
                yield (batch["lq"] if self.with_lq else None), batch["gt"]
            self.passes += 1
            print(f"data.loader=stream: the stream ended (pass {self.passes}); starting it again", flush=True)

    def state_dict(self) -> dict[str, Any]:
        """The newest epoch trained on and one past the highest position trained on in it (-1, 0: none yet)."""
        return {"loader": STREAM_LOADER, "epoch": self.epoch, "next_position": self.next_position}

    def _advance(self, epochs: torch.Tensor, positions: torch.Tensor) -> None:
        newest = int(epochs.max())
        if newest > self.epoch:
            self.epoch, self.next_position = newest, 0
        self.next_position = max(self.next_position, int(positions[epochs == newest].max()) + 1)
