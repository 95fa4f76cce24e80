"""The parts of data.loader=stream that need no cluster: the Ray Data task's epochs, orders and resume skip,
the resume position read from workers' states, and the worker-side position bookkeeping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gan_core.data import encode_png
from gan_core.data.stream import crop_row, row_key
from jobs.training.stream import ReadAndCrop, StreamBatches, StreamStart, row_counts, shard_file_list, stream_start

PATCH = {"patch_size": 16, "scale": 4, "hflip": True, "rot90": True, "color_jitter": 0.0, "degradation": None,
         "with_lq": True}


def _shards(folder, counts):
    rng = np.random.default_rng(0)
    for number, count in enumerate(counts):
        images = [encode_png(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(count)]
        pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), folder / f"part-{number:05d}.parquet")
    files = shard_file_list(str(folder))
    return files, row_counts(files)


def _run(task, items):
    out = list(task({"id": np.asarray(items)}))
    return {key: np.concatenate([part[key] for part in out]) for key in out[0]}


def test_each_epoch_visits_every_row_once_in_a_seeded_order(tmp_path):
    files, counts = _shards(tmp_path, [5, 3, 4])
    assert counts == [5, 3, 4]
    task = ReadAndCrop(files, counts, PATCH, seed=1, start=StreamStart(), chunk=4)
    epochs = _run(task, range(6))  # items 0-2: epoch 0, items 3-5: epoch 1
    assert epochs["epoch"].tolist() == [0] * 12 + [1] * 12
    assert epochs["position"].tolist() == list(range(12)) * 2
    assert not np.array_equal(epochs["gt"][:12], epochs["gt"][12:])  # another crop in another epoch
    again = _run(ReadAndCrop(files, counts, PATCH, seed=1, start=StreamStart(), chunk=3), range(6))
    np.testing.assert_array_equal(again["gt"], epochs["gt"])  # the chunking does not change a patch
    # Every patch is crop_row of some row of the file set, keyed by (seed, epoch, row).
    table = pq.read_table(files[0]).column("image").to_pylist()
    some = {crop_row(table[r], row_id=row_key(0, r), epoch=0, seed=1, **PATCH)[1].numpy().tobytes() for r in range(5)}
    assert some <= {patch.tobytes() for patch in epochs["gt"][:12]}


def test_a_resumed_stream_skips_the_trained_positions_of_its_epoch(tmp_path):
    files, counts = _shards(tmp_path, [5, 3, 4])
    full = _run(ReadAndCrop(files, counts, PATCH, seed=1, start=StreamStart(), chunk=4), range(9))
    resumed = _run(ReadAndCrop(files, counts, PATCH, seed=1, start=StreamStart(1, 7), chunk=4), range(6))
    assert resumed["epoch"].tolist() == [1] * 5 + [2] * 12 and resumed["position"][:5].tolist() == [7, 8, 9, 10, 11]
    np.testing.assert_array_equal(resumed["gt"], full["gt"][12 + 7:])  # the same patches an unbroken run cuts


def test_stream_start_takes_the_newest_epoch_and_the_highest_position_in_it():
    states = [{"loader": "stream", "epoch": 3, "next_position": 40}, {"loader": "stream", "epoch": 3, "next_position": 52},
              {"loader": "stream", "epoch": 2, "next_position": 90}]
    assert stream_start(states) == StreamStart(3, 52)
    assert stream_start([{"epoch": 1, "position": 4, "num_images": 9}, None]) == StreamStart()  # memory-mode states
    assert stream_start([{"loader": "stream", "epoch": -1, "next_position": 0}]) == StreamStart()


class _Shard:
    """Stands in for a DataIterator: the batches of one pass."""

    def __init__(self, batches):
        self.batches = batches

    def iter_torch_batches(self, **_):
        return iter(self.batches)


def test_stream_batches_yield_sampler_batches_and_track_positions():
    def batch(epochs, positions):
        n = len(epochs)
        return {"lq": torch.zeros(n, 3, 4, 4), "gt": torch.ones(n, 3, 16, 16), "epoch": torch.tensor(epochs),
                "position": torch.tensor(positions)}

    stream = StreamBatches(_Shard([batch([0, 0], [5, 2]), batch([0, 1], [9, 0])]), batch_size=2, prefetch_batches=1)
    batches = iter(stream)
    lq, gt = next(batches)
    assert lq.shape == (2, 3, 4, 4) and gt.shape == (2, 3, 16, 16)
    assert stream.state_dict() == {"loader": "stream", "epoch": 0, "next_position": 6}
    next(batches)
    assert stream.state_dict() == {"loader": "stream", "epoch": 1, "next_position": 1}
    blind = iter(StreamBatches(_Shard([batch([0], [0])]), batch_size=1, prefetch_batches=1, with_lq=False))
    lq, gt = next(blind)
    assert lq is None and gt.shape == (1, 3, 16, 16)
