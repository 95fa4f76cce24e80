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

from gan_core.config import config_to_yaml, flatten, load_config
from jobs.cli import init_ray, run_main
from jobs.tracking.server import TRACKING_HELP


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
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num-workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from jobs.tracking.runs import get_or_create_run, git_commit, log_params_once, ray_job_id
    from jobs.tracking.server import connect
    from jobs.training.report import finish_run, print_summary
    from jobs.training.trainer import build_trainer, with_absolute_paths, with_local_init_from

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # fails here, before Ray starts, on any bad key
    run_name = args.name or cfg.run.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = with_absolute_paths(cfg.with_values({"run.name": run_name}))
    tracking_uri = connect(args.tracking_uri)
    cfg = with_local_init_from(cfg)
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
    trainer = build_trainer(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu, loop_config=loop_config)
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
