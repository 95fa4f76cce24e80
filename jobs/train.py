"""DDP GAN training on Ray Train, tracked in MLflow, resumable.

Locally (starts a local Ray unless $RAY_ADDRESS is set; MLflow defaults to sqlite:///mlflow.db):
    python -m jobs.prepare_data --demo
    python -m jobs.train --config jobs/configs/demo.yaml --num-workers 2
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/esrgan_x4_psnr.yaml --num-workers 8 --use-gpu
Rerunning with the same --name continues from the latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gan_core.config import Config, config_from_dict, config_to_yaml, flatten, load_config
from jobs.common import (
    JobError,
    check_tracking_server,
    git_commit,
    init_ray,
    ray_job_id,
    resolve_tracking_uri,
    run_main,
)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP worker: build, restore, train, validate, checkpoint. Shared with jobs.tune.

    `loop_config` holds `config` (the resolved Config as a dict), `tracking_uri` and `run_id`
    (rank 0 logs there; None disables MLflow), and optionally `resume_from`: a checkpoint to start
    from when this run has none of its own yet (jobs.tune: a trial's last or a PBT donor's checkpoint).
    """
    import ray.train
    import ray.train.torch

    from jobs.worker import TrainingWorker

    # 1. Where am I, what runs here.
    context = ray.train.get_context()
    worker = TrainingWorker(
        cfg=config_from_dict(loop_config["config"]),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        tracking_uri=loop_config.get("tracking_uri"),
        run_id=loop_config.get("run_id"),
    )
    # 2. Models and optimizers, restored from the latest checkpoint after a failure or a rerun.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            worker.restore(Path(directory))
    # 3. DDP: G and D wrapped separately. D keeps its own buffers (spectral-norm vectors, BatchNorm
    #    statistics): broadcasting them between its real and fake calls breaks autograd.
    worker.wrap_models(
        lambda model: ray.train.torch.prepare_model(model),
        lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False}),
    )
    # 4. This worker's own shard of the training images (no two workers share patches in an epoch).
    rows = ray.train.get_dataset_shard("train").iter_rows()
    worker.load_train_images((row["image"], row.get("source")) for row in rows)

    # 5. Train; every checkpoint is a barrier that all workers reach together.
    def report(metrics: dict[str, float], directory: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)

    worker.run(report)


def build_trainer(cfg: Config, args: argparse.Namespace, run_name: str, loop_config: dict[str, Any],
                  callbacks: list | None = None, resources_per_worker: dict[str, float] | None = None):
    """The TorchTrainer for one run (also used by jobs.tune, one per trial, with its callbacks and resources)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_path = Path(cfg.data.train)
    if not train_path.exists() and "://" not in cfg.data.train:
        raise JobError(
            f"data.train={cfg.data.train} does not exist. Write Parquet shards first: "
            "`python -m jobs.prepare_data --demo` (demo) or `python -m jobs.prepare_data --src <images> --out <dir>`"
        )
    dataset = ray.data.read_parquet(cfg.data.train)
    if cfg.data.sampling == "source":
        if "source" not in dataset.schema().names:
            raise JobError(f"data.sampling=source needs a `source` column in the shards of {cfg.data.train}; "
                           "rewrite them with `python -m jobs.prepare_data` or use data.sampling=tile")
        # Rows mixed across workers, so that every worker sees every source photo (a shard holds a few photos).
        dataset = dataset.select_columns(["image", "source"]).random_shuffle(seed=cfg.train.seed)
    else:
        dataset = dataset.select_columns(["image"])
    # Same seed, same run: which rows each worker gets must not depend on which Ray Data task finishes
    # first (it did when two trials trained at once: equal-LR trials drifted apart by 2e-5 dB).
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.run.storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute=cfg.run.checkpoint_metric,
                checkpoint_score_order=cfg.run.checkpoint_mode,
            ),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def resolve_local_paths(cfg: Config) -> None:
    """Make relative local paths absolute: Ray workers run in another working directory."""
    for section, key in (("data", "train"), ("data", "val"), ("train", "init_from"), ("run", "storage_path")):
        owner = getattr(cfg, section)
        value = getattr(owner, key)
        if value and "://" not in value and ":/" not in value and Path(value).exists():
            setattr(owner, key, str(Path(value).resolve()))
    if "://" not in cfg.run.storage_path:
        cfg.run.storage_path = str(Path(cfg.run.storage_path).resolve())


def resolve_init_from(cfg: Config, run_name: str) -> None:
    """An MLflow URI in train.init_from is downloaded once, by the driver, into the run's storage folder
    (shared storage on a cluster), and the workers read that file."""
    from jobs.model_source import is_mlflow_uri, resolve_model

    spec = cfg.train.init_from
    if not spec or not is_mlflow_uri(spec):
        return
    if "://" in cfg.run.storage_path:
        raise JobError(f"train.init_from={spec} needs a file-system run.storage_path (NFS on a cluster), "
                       f"not {cfg.run.storage_path}; download the model and pass its path instead")
    target = Path(cfg.run.storage_path) / run_name / "init_from"
    source = resolve_model(spec, target)
    cfg.train.init_from = str(source.path)
    print(f"train.init_from: {spec} -> {source.path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train an ESRGAN-style GAN with DDP on Ray Train, tracked in MLflow.",
        epilog="Overrides: any config key as section.key=value, e.g. optim.g_lr=2e-4 train.total_steps=200",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. jobs/configs/demo.yaml")
    parser.add_argument("--num-workers", type=int, default=2, help="DDP workers (default 2)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    parser.add_argument("--name", help="run name (default run.name, else recipe-YYYYmmdd-HHMMSS); reuse it to resume")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num-workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.tracking import get_or_create_run, log_params_once
    from jobs.train_report import finish_run, print_summary

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # fails here, before Ray starts, on any bad key
    run_name = args.name or cfg.run.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.run.name = run_name
    resolve_local_paths(cfg)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    resolve_init_from(cfg, run_name)
    client = MlflowClient(tracking_uri)
    run_id, resumed = get_or_create_run(client, cfg.run.experiment, run_name, tags={"gan.recipe": args.config})
    log_params_once(client, run_id, flatten(cfg.model_dump(mode="json")) | {"num_workers": args.num_workers})
    client.set_tag(run_id, "git_commit", git_commit())
    client.set_tag(run_id, "ray_job_id", ray_job_id())
    client.set_tag(run_id, "checkpoint_location", f"{cfg.run.storage_path}/{run_name}")
    client.log_text(run_id, config_to_yaml(cfg), "config.yaml")
    print(f"{'resuming' if resumed else 'starting'} run {run_name!r}: MLflow run {run_id} at {tracking_uri}", flush=True)

    init_ray(num_cpus_hint=args.num_workers + 1)
    loop_config = {"config": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id}
    trainer = build_trainer(cfg, args, run_name, loop_config)
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    try:
        metrics = finish_run(client, run_id, cfg, result)
    except Exception as err:  # training is done and checkpointed; a tracking outage must not lose that
        print(f"!! could not log the final model to MLflow at {tracking_uri} ({type(err).__name__}: "
              f"{str(err)[:200]}); the checkpoint below is intact", file=sys.stderr, flush=True)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    print_summary(cfg, result, metrics, tracking_uri)
    return metrics


if __name__ == "__main__":
    run_main(main)
