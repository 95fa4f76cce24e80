"""data.loader=stream on a real local Ray cluster with 2 workers: Ray Data cuts the patches, the run trains,
checkpoints each worker's stream position, and a rerun with the same name resumes step and stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gan_core.config import load_config
from gan_core.checkpoint import load_sampler_state
from jobs.training.stream import StreamDatasetProvider, StreamStart, read_stream_start
from jobs.training.trainer import build_trainer
from tests.jobs.conftest import REPO, tiny_overrides

DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


def _fit(demo_data, storage, steps):
    overrides = tiny_overrides(demo_data, storage, steps, **{
        "data.loader": "stream", "data.sampling": "tile", "data.prefetch_batches": "1", "run.name": "stream",
        "run.num_to_keep": "10", "train.val_every": "2", "train.ckpt_every": "2", "train.log_every": "2"})
    cfg = load_config(DEMO, overrides)
    trainer = build_trainer(cfg, num_workers=2, use_gpu=False, loop_config={"config": cfg.model_dump(mode="json")})
    return cfg, trainer.fit()


def _checkpoints(storage: Path) -> list[Path]:
    return sorted(path for path in (storage / "stream").glob("checkpoint_*") if path.is_dir())


def test_stream_trains_checkpoints_positions_and_resumes(ray_local, demo_data, tmp_path, s3_server, monkeypatch,
                                                         capsys):
    cfg, first = _fit(demo_data, tmp_path, steps=4)
    assert first.error is None and first.metrics["step"] == 4 and "val/psnr_y" in first.metrics
    assert len(_checkpoints(tmp_path)) == 2  # steps 2 and 4
    with first.checkpoint.as_directory() as directory:
        states = [load_sampler_state(directory, rank) for rank in (0, 1)]
        start = read_stream_start(directory)
    for state in states:  # each worker saved where it is in the stream
        assert state["loader"] == "stream" and state["epoch"] == 0 and state["next_position"] > 0
    # 4 steps x 2 patches x 2 workers trained; the highest position is past them (Ray Data hands blocks out
    # in order to whichever worker asks), and that is where the rerun's stream starts.
    assert start == StreamStart(0, max(s["next_position"] for s in states)) and start.position >= 16
    assert StreamDatasetProvider(cfg, num_workers=2).start(cfg) == start
    # The same run folder on S3 (run.storage_path=s3://...): the provider reads the same start from the bucket.
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    on_s3 = cfg.with_values({"run.storage_path": s3_server.url("stream-runs")})
    assert StreamDatasetProvider(on_s3, num_workers=2).start(on_s3) == StreamStart()  # nothing there yet
    assert "the stream starts at epoch 0" in capsys.readouterr().out
    bucket = s3_server.client()
    for file in (tmp_path / "stream").rglob("*"):
        if file.is_file():
            bucket.upload_file(str(file), s3_server.bucket, f"stream-runs/stream/{file.relative_to(tmp_path / 'stream')}")
    assert StreamDatasetProvider(on_s3, num_workers=2).start(on_s3) == start

    cfg, second = _fit(demo_data, tmp_path, steps=6)
    assert second.error is None and second.metrics["step"] == 6
    # Resumed at step 4: only the step-6 checkpoint is new (a fresh start would have written 2, 4 and 6).
    assert len(_checkpoints(tmp_path)) == 3
    with second.checkpoint.as_directory() as directory:
        assert torch.load(Path(directory) / "checkpoint.pt", weights_only=False)["step"] == 6
        after = read_stream_start(directory)
    # The stream went on from the start position: every row it trained in epoch 0 lies after it.
    assert (after.epoch, after.position) > (start.epoch, start.position)
