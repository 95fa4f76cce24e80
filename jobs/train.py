"""DDP GAN training on Ray Train, tracked in MLflow, resumable.

Locally (starts a local Ray unless $RAY_ADDRESS is set; MLflow defaults to sqlite:///mlflow.db):
    python -m jobs.prepare_data --demo
    python -m jobs.train --config jobs/configs/demo.yaml --num-workers 2
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/esrgan_x4_psnr.yaml --num-workers 8 --use-gpu
Rerunning with the same --name continues from the latest checkpoint, in the same MLflow run.

However the job ends, its MLflow run is closed (jobs.tracking.runs.run_lifecycle); exit status:
    0    FINISHED: trained, final model logged
    1    FAILED: a non-finite loss (no restart: it would repeat), the final model not taken by MLflow
         (tag final_model_pending=true; rerun to log it), or another error
    2    a bad config, data path or tracking server, found before any MLflow run is created
    130  KILLED by SIGINT (Ctrl-C); 143 KILLED by SIGTERM. Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from gan_core.config import config_to_yaml, flatten, load_config
from jobs.cli import init_ray, json_resources, run_main, with_default_cpus, worker_count, workers_text
from jobs.tracking.server import TRACKING_HELP, redact_uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train an ESRGAN-style GAN with DDP on Ray Train, tracked in MLflow.",
        epilog="Overrides: any config key as section.key=value, e.g. optim.g_lr=2e-4 train.total_steps=200. "
               "Exit status: 0 finished, 1 failed (e.g. non-finite loss), 2 bad config/data/server (no MLflow run "
               "created), 130/143 stopped by SIGINT/SIGTERM (rerun the same command to resume).",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. jobs/configs/demo.yaml")
    parser.add_argument("--num-workers", type=worker_count, default=2, metavar="N|MIN-MAX",
                        help="DDP workers (default 2); MIN-MAX (e.g. 1-4) trains elastically: the group shrinks "
                             "when a node is lost and grows when one comes (back), each time from the latest "
                             "checkpoint, with the global batch held at data.batch_size x MAX (README: Elastic "
                             "and multi-node training)")
    parser.add_argument("--resources-per-worker", type=json_resources, metavar="JSON",
                        help='what each worker reserves, e.g. \'{"CPU": 1, "trainer": 1}\' with a custom `trainer` '
                             "resource on each node (ray start --resources) for one worker per node; without CPU, "
                             "Ray Train's default (1, or 0 with --use-gpu)")
    parser.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        help="how the workers spread over nodes (default PACK)")
    parser.add_argument("--resize-interval-s", type=float, default=60.0,
                        help="elastic runs: how often to look for more capacity (default 60)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    parser.add_argument("--name", help="run name (default run.name, else recipe-YYYYmmdd-HHMMSS); reuse it to resume")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--register", metavar="NAME",
                        help="register the final model as a new version of this registered model, with a model card")
    parser.add_argument("--tracking-wait-s", type=float, default=60.0,
                        help="at the end of the run, how long to wait for an unreachable MLflow server to take the "
                             "spooled metric points and the final model (default 60)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    # intermixed: options may follow the key=value overrides (`... demo.yaml data.train=... --name x`)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from mlflow.tracking import MlflowClient
    from ray.util.queue import Queue

    from jobs.tracking.runs import (
        CLOSE_WAIT_S,
        get_or_create_run,
        git_commit,
        log_params_once,
        ray_job_id,
        run_lifecycle,
    )
    from jobs.tracking.server import connect
    from jobs.training.report import finish_run, print_summary
    from jobs.training.trainer import (
        build_trainer,
        check_data_paths,
        elastic_loop_config,
        with_absolute_paths,
        with_local_init_from,
    )

    # 1. Everything that can be wrong with the command is found before an MLflow run exists.
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, use_gpu=args.use_gpu)  # fails here, before Ray starts, on any bad key
    run_name = args.name or cfg.run.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = with_absolute_paths(cfg.with_values({"run.name": run_name}))
    check_data_paths(cfg)
    if isinstance(args.num_workers, tuple):
        elastic_loop_config(cfg, args.num_workers)  # what an elastic run cannot do fails here, not mid-run
    tracking_uri = connect(args.tracking_uri)
    cfg = with_local_init_from(cfg)
    max_workers = args.num_workers[1] if isinstance(args.num_workers, tuple) else args.num_workers
    init_ray(num_cpus_hint=max_workers + 1)

    # 2. The run, closed FINISHED, FAILED or KILLED however this block ends.
    client = MlflowClient(tracking_uri)
    run_id, resumed = get_or_create_run(client, cfg.run.experiment, run_name, tags={"gan.recipe": args.config})
    close_wait_s = min(CLOSE_WAIT_S, args.tracking_wait_s)
    with run_lifecycle(client, run_id, tracking_uri=tracking_uri, close_wait_s=close_wait_s):
        workers = workers_text(args.num_workers)
        log_params_once(client, run_id, flatten(cfg.model_dump(mode="json")) | {"num_workers": workers})
        for key, value in {"git_commit": git_commit(), "ray_job_id": ray_job_id()}.items():
            if value and value != "unknown":  # no empty tags: a local run has no Ray job id
                client.set_tag(run_id, key, value)
        client.set_tag(run_id, "checkpoint_location", f"{cfg.run.storage_path}/{run_name}")
        client.log_text(run_id, config_to_yaml(cfg), "config.yaml")
        print(f"{'resuming' if resumed else 'starting'} run {run_name!r}: MLflow run {run_id} at "
              f"{redact_uri(tracking_uri)}", flush=True)

        # 3. Train. A non-finite loss comes back through `non_finite`, not as a worker error that Train would
        #    retry from the last checkpoint (see jobs/training/worker.py).
        #    The queue lives on this driver's node: on a node that goes away (spot) it would take the answer along.
        non_finite = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node()})
        loop_config = {"config": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                       "tracking_wait_s": args.tracking_wait_s, "non_finite": non_finite}
        trainer = build_trainer(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu, loop_config=loop_config,
                                resources_per_worker=with_default_cpus(args.resources_per_worker, args.use_gpu),
                                placement_strategy=args.placement_strategy, resize_interval_s=args.resize_interval_s)
        result = fit_in_background(trainer)
        stopped = None if non_finite.empty() else non_finite.get()
        non_finite.shutdown()
        if stopped is not None:
            raise non_finite_error(stopped)

        # 4. The final model into MLflow.
        metrics = finish_run(client, run_id, cfg, result, wait_s=args.tracking_wait_s, register=args.register)
    print_summary(cfg, result, metrics, tracking_uri)
    return metrics


def driver_node():
    """A scheduling strategy that keeps an actor on this driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def fit_in_background(trainer):
    """`trainer.fit()` in a helper thread, while this (main) thread waits.

    Why: in the main thread, fit() blocks in ray.get and installs Ray Train's own SIGINT handler (which aborts
    the run and exits 0); in a helper thread it does neither, so SIGINT and SIGTERM reach run_lifecycle's
    handlers at once and the job exits 130 / 143 with its run KILLED. Ray stops the Train run's actors when
    this driver exits.

    Returns:
        fit()'s Result.

    Raises:
        What fit() raised.
    """
    outcome = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread, which raises it
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # signal handlers run in the main thread between these waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def non_finite_error(stopped: dict):
    """The driver's NonFiniteLossError for what a worker handed back, with the run's failure tags."""
    from gan_core.loop import NonFiniteLossError

    err = NonFiniteLossError(stopped["message"])
    err.mlflow_tags = {"failure": "non_finite_loss", "failure.step": str(stopped["step"])}
    return err


def cli() -> None:
    """`python -m jobs.train`: run_main's exit statuses, plus 1 with one line for a failed run and 130 / 143
    for an interrupted one (its MLflow run is closed by then)."""
    from gan_core.loop import NonFiniteLossError
    from jobs.tracking.runs import RunInterrupted
    from jobs.training.report import FinalModelNotLogged

    try:
        run_main(main)
    except RunInterrupted as stop:
        print(f"stopped by {stop.signal_name}; rerun the same command (same --name) to resume from the last "
              "checkpoint", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except (NonFiniteLossError, FinalModelNotLogged) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
