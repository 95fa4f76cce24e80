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
function, jobs/tune_trial.py) and its own MLflow run, nested under one run for the sweep. The space file
format is documented in jobs/tune_space.py and the README.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Any

from gan_core.config import Config, config_to_yaml
from jobs.common import (
    JobError,
    check_tracking_server,
    git_commit,
    init_ray,
    ray_job_id,
    resolve_tracking_uri,
    run_main,
)
from jobs.tune_space import (
    TIME_ATTR,
    AshaScheduler,
    PbtScheduler,
    SpaceFile,
    build_param_space,
    check_samples,
    clip_to_bounds,
    load_space,
    resolve_base_config,
)

DATA_CPUS = 1.0  # kept free: Ray Data's read tasks feed every trial's workers at its start and need a CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tune",
        description="Sweep a training recipe with Ray Tune; every trial is a DDP run on Ray Train, tracked in MLflow.",
        epilog="Overrides: any config key as section.key=value, applied to the base recipe of every trial",
    )
    parser.add_argument("--space", required=True, help="space file, e.g. tune_spaces/demo_asha.yaml")
    parser.add_argument("--num-samples", type=int, help="trials to sample (default: the space file's num_samples)")
    parser.add_argument("--workers-per-trial", type=int, default=2, help="DDP workers per trial (default 2)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    parser.add_argument("--name", help="sweep name (default <space>-YYYYmmdd-HHMMSS); reuse it to resume")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="logical CPUs each training worker holds (default: Ray's, 1 on CPU, 0 with --use-gpu); "
                             "a fraction packs more trials onto a small machine")
    parser.add_argument("--trial-cpus", type=float, default=1.0,
                        help="logical CPUs of each trial's own driver, which runs the TorchTrainer (default 1)")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials at once (default: as many as the cluster's current resources hold; "
                             "set it on an autoscaling cluster)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every trial, key=value")
    args = parser.parse_args(argv)
    if args.workers_per_trial < 1:
        parser.error("--workers-per-trial must be at least 1")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    if args.trial_cpus <= 0 or (args.cpus_per_worker is not None and args.cpus_per_worker < 0):
        parser.error("--trial-cpus must be positive and --cpus-per-worker not negative")
    if args.cpus_per_worker == 0 and not args.use_gpu:
        parser.error("--cpus-per-worker 0 leaves CPU workers without any resource; give a fraction such as 0.5")
    return args


def trial_demand(args: argparse.Namespace) -> dict[str, float]:
    """Logical resources one running trial holds: its driver plus K workers (Tune sees only the driver)."""
    worker_cpus = args.cpus_per_worker if args.cpus_per_worker is not None else (0.0 if args.use_gpu else 1.0)
    return {"CPU": args.trial_cpus + args.workers_per_trial * worker_cpus,
            "GPU": float(args.workers_per_trial) if args.use_gpu else 0.0}


def plan_concurrency(cluster: dict[str, float], args: argparse.Namespace, num_trials: int) -> int:
    """How many trials may run at once without one trial's workers waiting on another's forever.

    Train V2 reserves each trial's workers in a placement group Tune knows nothing about, so Tune alone
    would start a trial per free CPU and starve all of them. Here: (CPUs - DATA_CPUS) / per-trial CPUs,
    and GPUs / per-trial GPUs, whichever is smaller.

    Raises:
        JobError: not even one trial fits.
    """
    demand = trial_demand(args)
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    by_cpu = math.floor((cpus - DATA_CPUS) / demand["CPU"] + 1e-9) if demand["CPU"] else num_trials
    by_gpu = math.floor(gpus / demand["GPU"] + 1e-9) if demand["GPU"] else num_trials
    fits = min(by_cpu, by_gpu)
    worker_cpus = (demand["CPU"] - args.trial_cpus) / args.workers_per_trial
    gpu_each = " + 1 GPU" if args.use_gpu else ""
    gpu_total = f", {demand['GPU']:g} GPUs" if args.use_gpu else ""
    print(f"[tune] cluster: {cpus:g} CPUs, {gpus:g} GPUs. Each trial holds {args.trial_cpus:g} CPU (its driver) + "
          f"{args.workers_per_trial} workers x {worker_cpus:g} CPU{gpu_each} = {demand['CPU']:g} CPUs{gpu_total}; "
          f"{DATA_CPUS:g} CPU stays free for Ray Data.", flush=True)
    if fits < 1:
        raise JobError(
            f"one trial needs {demand['CPU']:g} CPUs{gpu_total} (+ {DATA_CPUS:g} CPU for data); the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs: lower --workers-per-trial, --cpus-per-worker or --trial-cpus, "
            "or add nodes"
        )
    chosen = args.max_concurrent or fits
    if args.max_concurrent and args.max_concurrent > fits:
        print(f"[tune] --max-concurrent {args.max_concurrent} is above the {fits} that fit now: trials beyond that "
              "wait for nodes (autoscaling) or for each other", flush=True)
    print(f"[tune] {num_trials} trial(s), at most {chosen} at a time", flush=True)
    return chosen


def count_trials(space: SpaceFile, num_samples: int) -> int:
    grid = math.prod(len(dist.grid) for dist in space.param_space.values() if dist.kind == "grid")
    return num_samples * grid


def build_scheduler(space: SpaceFile, base: Config):
    """The Tune scheduler named by the space file; schedulers count G steps (`step`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    scheduler = space.scheduler
    if isinstance(scheduler, AshaScheduler):
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=scheduler.max_t or base.train.total_steps,
                             grace_period=scheduler.grace_period, reduction_factor=scheduler.reduction_factor,
                             brackets=scheduler.brackets)
    if isinstance(scheduler, PbtScheduler):
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=scheduler.perturbation_interval,
            burn_in_period=scheduler.burn_in_period, quantile_fraction=scheduler.quantile_fraction,
            resample_probability=scheduler.resample_probability,
            perturbation_factors=tuple(scheduler.perturbation_factors), synch=scheduler.synch,
            hyperparam_mutations={key: dist.to_mutation() for key, dist in scheduler.hyperparam_mutations.items()},
            custom_explore_fn=functools.partial(clip_to_bounds, bounds=scheduler.mutation_bounds()),
        )
    return FIFOScheduler()


def build_search(space: SpaceFile, max_concurrent: int) -> tuple[Any, int | None]:
    """(search algorithm, max_concurrent_trials for TuneConfig): the limit lives in exactly one of them."""
    if space.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=space.seed), max_concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=space.seed), None


# Tune's status of each trial at the sweep's last step (RUNNING / PENDING / PAUSED ones were interrupted).
trial_statuses: dict[str, str] = {}


def _status_recorder():
    from ray import tune

    class RecordTrialStatus(tune.Callback):
        """Driver-side: remember each trial's Tune status (a restored sweep unpickles its own copy).

        Only during the loop: on Ctrl-C, Tune stops the running trials as TERMINATED before its end hooks,
        though they resume on a rerun.
        """

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            trial_statuses.update({trial.trial_id: trial.status for trial in trials})

    return RecordTrialStatus()


def trial_name(trial) -> str:
    """Trials and their folders are named by trial id (jobs.tune_trial recognises a donor by it)."""
    return trial.trial_id


def trial_settings(space: SpaceFile, base: Config, args: argparse.Namespace, sweep: str, tracking_uri: str,
                   parent_run_id: str) -> dict[str, Any]:
    """The constants every trial needs (handed to jobs.tune_trial.run_trial with tune.with_parameters)."""
    return {
        "base": base.model_dump(mode="json"), "searched_keys": space.searched_keys(), "sweep": sweep,
        "tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "workers_per_trial": args.workers_per_trial,
        "use_gpu": args.use_gpu,
        "resources_per_worker": None if args.cpus_per_worker is None else {"CPU": args.cpus_per_worker},
        "train_storage": f"{base.run.storage_path}/{sweep}-train",
    }


def build_tuner(space: SpaceFile, base: Config, args: argparse.Namespace, sweep: str, settings: dict[str, Any],
                max_concurrent: int, num_samples: int):
    """A new Tuner, or the interrupted one of the same name restored."""
    from ray import tune

    from jobs.tune_trial import make_trainable

    trainable = tune.with_resources(make_trainable(settings), {"CPU": args.trial_cpus})
    path = f"{base.run.storage_path}/{sweep}"
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming sweep {sweep!r} from {path}: finished trials are kept, the others continue from "
              "their last checkpoint (the space saved with the sweep is used)", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    pbt = isinstance(space.scheduler, PbtScheduler)
    search_alg, limit = build_search(space, max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=build_param_space(space),
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=build_scheduler(space, base),
            num_samples=num_samples, max_concurrent_trials=limit, reuse_actors=False,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep, storage_path=base.run.storage_path,
            # PBT clones recent checkpoints (Ray advises keeping more than 2); the others keep their best ones.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=max(4 if pbt else 2, base.run.num_to_keep),
                checkpoint_score_attribute=None if pbt else space.metric,
                checkpoint_score_order=space.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=base.run.max_failures),
            callbacks=[_status_recorder()],
        ),
    )


def start_parent_run(client, space: SpaceFile, base: Config, args: argparse.Namespace, sweep: str,
                     max_concurrent: int, num_samples: int) -> str:
    """The sweep's MLflow run (found again on resume), with the space file, the base config and the settings."""
    from jobs.tracking import get_or_create_run, log_params_once

    run_id, resumed = get_or_create_run(client, base.run.experiment, sweep,
                                        tags={"gan.space": args.space, "gan.kind": "sweep"})
    scheduler = space.scheduler.model_dump(exclude={"hyperparam_mutations"})
    params = {f"scheduler.{k}": v for k, v in scheduler.items()} | {
        "base": space.base, "metric": space.metric, "mode": space.mode, "search_alg": space.search_alg,
        "num_samples": num_samples, "workers_per_trial": args.workers_per_trial, "max_concurrent": max_concurrent,
        "searched_keys": ",".join(space.searched_keys()),
    }
    log_params_once(client, run_id, params)
    client.set_tag(run_id, "git_commit", git_commit())
    client.set_tag(run_id, "ray_job_id", ray_job_id())
    client.log_artifact(run_id, args.space)
    client.log_text(run_id, config_to_yaml(base), "base_config.yaml")
    print(f"[tune] {'resuming' if resumed else 'starting'} sweep {sweep!r}: MLflow run {run_id}", flush=True)
    return run_id


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from jobs.train import resolve_local_paths
    from jobs.tune_report import collect_trials, finish_sweep, print_summary

    args = parse_args(argv)
    # 1. Everything that can be wrong with the space is found here, before Ray starts.
    space = load_space(args.space)
    base = resolve_base_config(space, args.overrides)
    checked = check_samples(space, base)
    num_samples = args.num_samples or space.num_samples
    num_trials = count_trials(space, num_samples)
    print(f"[tune] space {args.space}: {len(space.searched_keys())} searched keys, {checked} edge configs valid, "
          f"scheduler {space.scheduler.name}, search {space.search_alg}, {space.metric} ({space.mode})", flush=True)
    sweep = args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    resolve_local_paths(base)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_server(tracking_uri)

    # 2. Ray, and how many trials fit at once.
    import ray

    # A local Ray gets room for one trial (ASHA, FIFO) or the whole population (PBT); a cluster has what it has.
    population = num_trials if isinstance(space.scheduler, PbtScheduler) else 1
    init_ray(num_cpus_hint=math.ceil(trial_demand(args)["CPU"] * population + DATA_CPUS))
    max_concurrent = plan_concurrency(ray.cluster_resources(), args, num_trials)
    if isinstance(space.scheduler, PbtScheduler) and num_trials > max_concurrent:
        print(f"[tune] warning: PBT population {num_trials} > {max_concurrent} concurrent trials; trials beyond "
              "that start only when others finish, and only running trials exploit each other", flush=True)

    # 3. The sweep's MLflow run, then Tune.
    client = MlflowClient(tracking_uri)
    parent_run_id = start_parent_run(client, space, base, args, sweep, max_concurrent, num_samples)
    settings = trial_settings(space, base, args, sweep, tracking_uri, parent_run_id)
    tuner = build_tuner(space, base, args, sweep, settings, max_concurrent, num_samples)
    try:
        results = tuner.fit()
    except Exception:
        client.set_terminated(parent_run_id, status="FAILED")
        raise

    # 4. The table, the best trial, MLflow.
    rows = collect_trials(results, space, settings["base"], client, parent_run_id, trial_statuses)
    best = finish_sweep(client, parent_run_id, rows, space, settings["base"])
    print_summary(rows, best, space, tracking_uri, parent_run_id, f"{base.run.storage_path}/{sweep}")
    if any(row["status"] == "interrupted" for row in rows):
        print(f"[tune] the sweep was interrupted: rerun the same command with --name {sweep} to resume it", flush=True)
    return {"sweep": sweep, "parent_run_id": parent_run_id, "trials": rows, "best": best}


if __name__ == "__main__":
    run_main(main)
