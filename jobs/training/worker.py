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

from pathlib import Path
from typing import Any

from gan_core import loop
from gan_core.config import config_from_dict
from gan_core.data import ImageDecodeError, decode_image


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, restore, train, validate, checkpoint.

    `loop_config` holds `config` (the resolved Config as a dict), `tracking_uri` and `run_id` (rank 0 logs
    there; None disables MLflow), and optionally `resume_from`: a checkpoint to start from when this run
    has none of its own yet (jobs.tune: a trial's last or a PBT donor's checkpoint); `tracking_wait_s`: how
    long the end of the run waits for an unreachable MLflow server to take the spooled metric points
    (default 60); `non_finite`: a `ray.util.queue.Queue` that gets a non-finite loss instead of an error
    (see the module docstring).
    """
    import ray.train
    import ray.train.torch

    # 1. Where am I, what runs here.
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    state = loop.setup_state(cfg, device)
    logger = None
    if rank == 0 and loop_config.get("tracking_uri") and loop_config.get("run_id"):
        from jobs.tracking.runs import RunLogger

        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"],
                           skip_logged_steps=loop_config.get("skip_logged_steps", True))

    # 2. Models and optimizers, restored from the latest checkpoint after a failure or a rerun.
    sampler_state = None
    checkpoint = ray.train.get_checkpoint() or loop_config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, sampler_state = loop.restore(state, directory, cfg, rank)
        if rank == 0:
            print(f"restored step {state.step} from {checkpoint.path}", flush=True)

    # 3. DDP: G and D wrapped separately. D keeps its own buffers (spectral-norm vectors, BatchNorm
    #    statistics): broadcasting them between its real and fake calls breaks autograd.
    loop.wrap_models(
        state, cfg,
        lambda model: ray.train.torch.prepare_model(model),
        lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False}),
    )

    # 4. This worker's own shard of the training images (no two workers share patches in an epoch).
    rows = ray.train.get_dataset_shard("train").iter_rows()
    images, sources = decode_rows(((row["image"], row.get("source")) for row in rows), rank)
    sampler = loop.make_sampler(cfg, images, rank=rank, sources=sources, sampler_state=sampler_state)
    photos = f" from {len(set(sources))} source photos" if cfg.data.sampling == "source" else ""
    print(f"worker {rank}: {len(images)} training images{photos}, {len(sampler.skipped)} smaller than a patch",
          flush=True)

    # 5. Train; every report is a barrier that all workers reach together.
    def report(metrics: dict[str, float], directory: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)) if directory else None)

    hooks = loop.Hooks(
        validate=loop.validator(state, loop.load_validation_images(cfg), cfg, device,
                                lpips=loop.validation_lpips(device, announce=rank == 0), rank=rank,
                                world_size=world_size,
                                on_sample=logger.sample_grid if logger is not None else None),
        checkpoint=loop.checkpointer(state, cfg, sampler, rank=rank,
                                     extra={"mlflow_run_id": loop_config.get("run_id") or ""}),
        report=report,
        log=logger.metrics if logger is not None else loop.Hooks.log,
    )
    non_finite = loop_config.get("non_finite")
    wait_s = 0.0  # after an error, one try to send the spooled metric points: Train restarts or fails the run
    try:
        loop.fit(state, loop.device_batches(sampler, device, cfg), cfg, hooks, rank=rank, world_size=world_size)
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


def decode_rows(rows, rank: int) -> tuple[list, list]:
    """Decode this worker's shard rows of (encoded image, source photo); undecodable rows are skipped and counted.

    Raises:
        RuntimeError: no row decoded.
    """
    images, sources, skipped = [], [], []
    for index, (data, source) in enumerate(rows):
        try:
            images.append(decode_image(data, name=f"row {index}"))
            sources.append(source)
        except ImageDecodeError as err:
            skipped.append(str(err))
    if skipped and rank == 0:
        print(f"skipped {len(skipped)} undecodable training rows: {skipped[:3]}", flush=True)
    if not images:
        raise RuntimeError(f"worker {rank} received no decodable training images")
    return images, sources
