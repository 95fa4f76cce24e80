"""What one Ray Train worker runs: `gan_core.loop.fit` with Ray's report and MLflow logging as its hooks.

Shared by `jobs.train` (one TorchTrainer) and `jobs.tune` (one TorchTrainer per trial). The loop itself,
its cadence and its reductions over workers live in `gan_core/loop.py`; this file holds the numbered
distributed steps around it.

A non-finite loss is deterministic: Ray Train's restart from the last checkpoint (FailureConfig) would only
replay it. With `non_finite` in the loop config (jobs.train), every worker catches it instead, at the same
step, and returns without another report (reports are barriers: every worker makes the same number), so Train
ends normally, without a restart; rank 0 hands `{"message", "step"}` to the driver through that queue.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from gan_core import loop
from gan_core.config import config_from_dict
from gan_core.data import ImageDecodeError
from gan_core.data.shards import decode_example


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, restore, train, validate, checkpoint.

    `loop_config` holds `config` (the resolved Config as a dict), `tracking_uri` and `run_id` (rank 0 logs
    there; None disables MLflow), and optionally `resume_from`: a checkpoint to start from when this run
    has none of its own yet (jobs.tune: a trial's last or a PBT donor's checkpoint); `tracking_wait_s`: how
    long the end of the run waits for an unreachable MLflow server to take the spooled metric points
    (default 60); `non_finite`: a `ray.util.queue.Queue` that gets a non-finite loss instead of an error
    (see the module docstring); `global_batch`: an elastic run's global batch, held constant whatever the
    group's size (each worker trains on its share, `loop.per_worker_batch`).
    """
    import ray.train
    import ray.train.torch

    # 1. Where am I, what runs here.
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if loop_config.get("global_batch"):  # elastic: the global batch, the LR schedule and the GAN balance hold
        cfg = cfg.with_values({"data.batch_size": loop.per_worker_batch(loop_config["global_batch"], rank, world_size)})
    with local_init_from(cfg, loop_config.get("tracking_uri")) as cfg:
        state = loop.setup_state(cfg, device)
    logger = None
    if rank == 0 and loop_config.get("tracking_uri") and loop_config.get("run_id"):
        from jobs.tracking.runs import RunLogger

        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"],
                           skip_logged_steps=loop_config.get("skip_logged_steps", True))

    # 2. Models and optimizers, restored from the latest checkpoint after a failure or a rerun.
    #    A checkpoint of a group of another size (an elastic resize) restores the models and the step, not the
    #    sampler positions: the shards were split anew, so the samplers start afresh, seeded by the step.
    sampler_state, data_seed = None, None
    checkpoint = ray.train.get_checkpoint() or loop_config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, sampler_state = loop.restore(state, directory, cfg, rank, world_size=world_size)
            written_by = loop.checkpoint_world_size(directory)
        if written_by not in (None, world_size):
            data_seed = loop.resized_data_seed(cfg.train.seed, state.step)
        if rank == 0:
            resized = f" (written by {written_by} workers, now {world_size}: fresh samplers)" if data_seed else ""
            print(f"restored step {state.step} from {checkpoint.path}{resized}", flush=True)

    # 3. DDP: G and D wrapped separately. D keeps its own buffers (spectral-norm vectors, BatchNorm
    #    statistics): broadcasting them between its real and fake calls breaks autograd.
    loop.wrap_models(
        state, cfg,
        lambda model: ray.train.torch.prepare_model(model),
        lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False}),
    )
    record_worker_group(state.step, rank, world_size, cfg.data.batch_size, logger, restored=checkpoint is not None)

    # 4. This worker's own shard of the training images (no two workers share patches in an epoch): in
    #    memory, or (data.loader=stream) a bounded stream of patches that Ray Data tasks cut; the stream's
    #    position was restored by the dataset provider (jobs/training/stream.py), not here.
    if cfg.data.loader == "stream":
        from jobs.training.stream import StreamBatches

        sampler = StreamBatches(ray.train.get_dataset_shard("train"), batch_size=cfg.data.batch_size,
                                prefetch_batches=cfg.data.prefetch_batches, with_lq=cfg.data.blind is None)
        print(f"worker {rank}: streaming patches, {cfg.data.prefetch_batches} batches prefetched", flush=True)
    else:
        if sampler_state is not None and sampler_state.get("loader") == "stream":
            print(f"worker {rank}: the checkpoint holds a stream position; data.loader=memory starts a new sampler",
                  flush=True)
            sampler_state = None
        rows = ray.train.get_dataset_shard("train").iter_rows()
        images, sources = decode_rows(((row["image"], row.get("input"), row.get("source")) for row in rows), rank)
        sampler = loop.make_sampler(cfg, images, rank=rank, sources=sources, sampler_state=sampler_state,
                                    seed=data_seed)
        photos = f" from {len(set(sources))} source photos" if cfg.data.sampling == "source" else ""
        print(f"worker {rank}: {len(images)} training images{photos}, {len(sampler.skipped)} smaller than a patch",
              flush=True)
    blind = loop.make_blind(cfg, rank, sampler_state, seed=data_seed)  # data.blind: the LR is made on this worker's device

    # 5. Train; every report is a barrier that all workers reach together.
    def report(metrics: dict[str, float], directory: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if directory else None)

    hooks = loop.Hooks(
        validate=loop.validator(state, loop.load_validation_images(cfg), cfg, device,
                                lpips=loop.validation_lpips(device, announce=rank == 0), rank=rank,
                                world_size=world_size,
                                on_sample=logger.sample_grid if logger is not None else None),
        checkpoint=loop.checkpointer(state, cfg, sampler, rank=rank,
                                     extra={"mlflow_run_id": loop_config.get("run_id") or ""}, blind=blind),
        report=report,
        # The group's size with every log line: an elastic run's resizes show on the step axis.
        log=(lambda metrics, step: logger.metrics(metrics | {"train/world_size": world_size}, step))
        if logger is not None else loop.Hooks.log,
    )
    non_finite = loop_config.get("non_finite")
    wait_s = 0.0  # after an error, one try to send the spooled metric points: Train restarts or fails the run
    try:
        loop.fit(state, loop.device_batches(sampler, device, cfg, blind), cfg, hooks, rank=rank, world_size=world_size)
        wait_s = loop_config.get("tracking_wait_s", 60.0)
    except loop.NonFiniteLossError as err:
        if non_finite is None:
            raise
        # 6. Every worker is here, at the same step (the check reads all-reduced means): end, no restart.
        wait_s = loop_config.get("tracking_wait_s", 60.0)
        if rank == 0:
            non_finite.put({"message": str(err), "step": state.step})
    finally:
        if logger is not None:
            logger.close(wait_s)


def record_worker_group(step: int, rank: int, world_size: int, batch_size: int, logger, *, restored: bool) -> None:
    """Where each worker of this (re)started group runs: rank 0 prints it and logs it to the MLflow run as
    `workers/<unix ms>-step<step>.json` (one file per start of the group, so a restart, a node loss or an
    elastic resize shows where the run went on). With the record, `logged_up_to`: the highest step the run
    already held in MLflow, so `logged_up_to - step` is how many steps this start trains again."""
    import json
    import os
    import socket
    import time

    import ray
    import torch.distributed as dist

    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "batch_size": batch_size}
    workers = [None] * world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(workers, mine)
    else:
        workers = [mine]
    if rank != 0:
        return
    nodes = len({worker["node_id"] for worker in workers})
    print(f"worker group: {world_size} workers on {nodes} node(s) from step {step}: "
          + ", ".join(f"rank {w['rank']} on {w['node_ip']} ({w['node_id'][:8]})" for w in workers), flush=True)
    if logger is None:
        return
    record = {"step": step, "restored": restored, "world_size": world_size, "workers": workers,
              "time": time.time()}
    if restored:
        from jobs.tracking.runs import last_logged_steps

        with contextlib.suppress(Exception):  # the server may be down: the record is still worth logging
            record["logged_up_to"] = max(last_logged_steps(logger.client, logger.run_id).values(), default=step)
    logger.text(json.dumps(record, indent=1), f"workers/{int(record['time'] * 1000)}-step{step:07d}.json")


def decode_rows(rows, rank: int) -> tuple[list, list]:
    """Decode this worker's shard rows of (encoded image, encoded input of a pair or None, source photo) into
    examples (an image, or a pair's input and target stacked); undecodable rows are skipped and counted.

    Raises:
        RuntimeError: no row decoded.
    """
    images, sources, skipped = [], [], []
    for index, (data, input_data, source) in enumerate(rows):
        try:
            images.append(decode_example(data, input_data, name=f"row {index}"))
            sources.append(source)
        except ImageDecodeError as err:
            skipped.append(str(err))
    if skipped and rank == 0:
        print(f"skipped {len(skipped)} undecodable training rows: {skipped[:3]}", flush=True)
    if not images:
        raise RuntimeError(f"worker {rank} received no decodable training images")
    return images, sources


@contextlib.contextmanager
def local_init_from(cfg, tracking_uri: str | None):
    """`cfg` with a remote train.init_from (s3://..., or an MLflow URI when the run stores on S3) downloaded by
    this worker into a temporary folder, kept while the models are built. The driver downloads it once instead
    when run.storage_path is a file system all workers share (jobs.training.trainer.with_local_init_from)."""
    from jobs.tracking.model_source import is_mlflow_uri, is_remote_uri, resolve_model

    spec = cfg.train.init_from
    if not spec or not (is_remote_uri(spec) or is_mlflow_uri(spec)):
        yield cfg
        return
    if is_mlflow_uri(spec) and tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="init-from-") as tmp:
        yield cfg.with_values({"train.init_from": str(resolve_model(spec, tmp).path)})
