"""Hyperparameter sweeps with Ray Tune (ASHA, PBT, FIFO; random or Optuna search), each trial a DDP training run.

Locally (starts a local Ray unless $RAY_ADDRESS is set; MLflow defaults to sqlite:///mlflow.db):
    python -m jobs.prepare_data --demo
    python -m jobs.tune --space tune_spaces/demo_asha.yaml
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.tune --space tune_spaces/esrgan_asha.yaml --workers-per-trial 2 --use-gpu --name esrgan-asha-1
Rerunning with the same --name resumes an interrupted sweep (finished trials are kept, the others continue
from their last checkpoint); `key=value` arguments override the base recipe for every trial.

Each trial is the `train_loop_per_worker` of jobs.train on its own TorchTrainer (Train V2 inside a Tune
function, jobs/sweeps/trial.py) and its own MLflow run, nested under one run for the sweep. The space file
format is documented in jobs/sweeps/space.py and the README.

Exit status: 0 when every trial finished or was stopped early by the scheduler and at least one reported
the metric; 1 when any trial errored, no trial reported the metric, or the sweep was interrupted (the
summary table is printed first, then the reason; the sweep's MLflow run is FAILED when no trial
succeeded); 2 for a problem found before Ray starts (a bad space file, override or tracking server).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from jobs.cli import init_ray, json_resources, run_main, worker_count
from jobs.tracking.server import TRACKING_HELP

EXIT_TRIALS_FAILED = 1  # 2 is run_main's: a problem found before any trial started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tune",
        description="Sweep a training recipe with Ray Tune; every trial is a DDP run on Ray Train, tracked in MLflow.",
        epilog="Overrides: any config key as section.key=value, applied to the base recipe of every trial. "
               "Exit status 1 when any trial errored or none reported the metric (after the summary), 2 when the "
               "space, an override or the tracking server is wrong (before Ray starts).",
    )
    parser.add_argument("--space", required=True, help="space file, e.g. tune_spaces/demo_asha.yaml")
    parser.add_argument("--num-samples", type=int, help="trials to sample (default: the space file's num_samples)")
    parser.add_argument("--workers-per-trial", type=worker_count, default=2, metavar="N|MIN-MAX",
                        help="DDP workers per trial (default 2); MIN-MAX (e.g. 1-2) makes each trial elastic: it "
                             "goes on with fewer workers when a node is lost and grows back when one returns, as "
                             "jobs.train --num-workers MIN-MAX (the global batch stays data.batch_size x MAX)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    parser.add_argument("--name", help="sweep name (default <space>-YYYYmmdd-HHMMSS); reuse it to resume")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    parser.add_argument("--cpus-per-worker", type=float,
                        help="logical CPUs each training worker holds (default: Ray's, 1 on CPU, 0 with --use-gpu); "
                             "a fraction packs more trials onto a small machine")
    parser.add_argument("--resources-per-worker", type=json_resources, metavar="JSON",
                        help='custom resources each worker reserves too, e.g. \'{"trainer": 1}\' with one `trainer` '
                             "slot per node (ray start --resources) for one worker per node; CPU and GPU come from "
                             "--cpus-per-worker and --use-gpu")
    parser.add_argument("--trial-cpus", type=float, default=1.0,
                        help="logical CPUs of each trial's own driver, which runs the TorchTrainer (default 1)")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials at once (default: as many as the cluster's current resources hold; "
                             "set it on an autoscaling cluster)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every trial, key=value")
    args = parser.parse_intermixed_args(argv)  # options may follow the key=value overrides
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    if args.trial_cpus <= 0 or (args.cpus_per_worker is not None and args.cpus_per_worker < 0):
        parser.error("--trial-cpus must be positive and --cpus-per-worker not negative")
    if args.resources_per_worker and {"CPU", "GPU"} & set(args.resources_per_worker):
        parser.error("--resources-per-worker: give CPU with --cpus-per-worker and GPU with --use-gpu")
    if args.cpus_per_worker == 0 and not args.use_gpu:
        parser.error("--cpus-per-worker 0 leaves CPU workers without any resource; give a fraction such as 0.5")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns its name, parent run, trial rows, best row and `failure` (the reason
    the command exits 1, or None)."""
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.sweeps import tuner as sweeps
    from jobs.sweeps.report import collect_trials, finish_sweep, print_summary, sweep_failure
    from jobs.sweeps.space import PbtScheduler, check_samples, load_space, resolve_base_config
    from jobs.tracking.server import connect
    from jobs.training.trainer import check_data_paths, elastic_loop_config, with_absolute_paths

    args = parse_args(argv)
    # 1. Everything that can be wrong with the space is found here, before Ray starts.
    space = load_space(args.space)
    base = with_absolute_paths(resolve_base_config(space, args.overrides, use_gpu=args.use_gpu))
    checked = check_samples(space, base)
    check_data_paths(base)  # a typo in data.train / data.val fails here (exit 2), not in every trial
    if isinstance(args.workers_per_trial, tuple):
        elastic_loop_config(base, args.workers_per_trial)  # what an elastic trial cannot do fails here
    num_samples = args.num_samples or space.num_samples
    num_trials = sweeps.count_trials(space, num_samples)
    print(f"[tune] space {args.space}: {len(space.searched_keys())} searched keys, {checked} edge configs valid, "
          f"scheduler {space.scheduler.name}, search {space.search_alg}, {space.metric} ({space.mode})", flush=True)
    sweep = args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = connect(args.tracking_uri)

    # 2. Ray, and how many trials fit at once.
    #    A local Ray gets room for one trial (ASHA, FIFO) or the whole population (PBT); a cluster has what it has.
    resources = sweeps.TrialResources(workers=args.workers_per_trial, use_gpu=args.use_gpu,
                                      cpus_per_worker=args.cpus_per_worker, trial_cpus=args.trial_cpus,
                                      worker_resources=args.resources_per_worker or {})
    pbt = isinstance(space.scheduler, PbtScheduler)
    init_ray(num_cpus_hint=math.ceil(resources.demand()["CPU"] * (num_trials if pbt else 1) + sweeps.DATA_CPUS))
    max_concurrent = sweeps.plan_concurrency(ray.cluster_resources(), resources, num_trials, args.max_concurrent)
    if pbt and num_trials > max_concurrent:
        print(f"[tune] warning: PBT population {num_trials} > {max_concurrent} concurrent trials; trials beyond "
              "that start only when others finish, and only running trials exploit each other", flush=True)

    # 3. The sweep's MLflow run, then Tune.
    client = MlflowClient(tracking_uri)
    parent_run_id = sweeps.start_parent_run(client, space, base, args.space, sweep, workers_per_trial=resources.workers,
                                            max_concurrent=max_concurrent, num_samples=num_samples)
    settings = sweeps.trial_settings(space, base, resources, sweep, tracking_uri, parent_run_id)
    tuner = sweeps.build_tuner(space, base, sweep, settings, trial_cpus=resources.trial_cpus,
                               max_concurrent=max_concurrent, num_samples=num_samples)
    try:
        results = tuner.fit()
        # 4. The table, the best trial, MLflow (a crash while summing up must not leave the sweep RUNNING).
        rows = collect_trials(results, space, settings["base"], client, parent_run_id, sweeps.trial_statuses)
        best = finish_sweep(client, parent_run_id, rows, space, settings["base"])
    except Exception:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    print_summary(rows, best, space, tracking_uri, parent_run_id, f"{base.run.storage_path}/{sweep}")
    if any(row["status"] == "interrupted" for row in rows):
        print(f"[tune] the sweep was interrupted: rerun the same command with --name {sweep} to resume it", flush=True)
    failure = sweep_failure(rows, best, space.metric)
    if failure:
        print(f"[tune] sweep {sweep!r} failed: {failure}", file=sys.stderr, flush=True)
    return {"sweep": sweep, "parent_run_id": parent_run_id, "trials": rows, "best": best, "failure": failure}


def cli(argv: list[str] | None = None) -> None:
    """The command line: `main`, then exit status 1 when a trial errored or none reported the metric."""
    if main(argv)["failure"]:
        sys.exit(EXIT_TRIALS_FAILED)


if __name__ == "__main__":
    run_main(cli)
