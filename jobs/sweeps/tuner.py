"""The Ray Tune side of a sweep: how many trials fit, the scheduler and searcher, the Tuner, the parent run.

`jobs.tune` is the command; one trial is `jobs.sweeps.trial`, the space file `jobs.sweeps.space`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from gan_core.config import Config, config_to_yaml
from jobs.cli import JobError, workers_text
from jobs.sweeps.space import TIME_ATTR, AshaScheduler, PbtScheduler, SpaceFile, build_param_space, clip_to_bounds
from jobs.sweeps.trial import make_trainable
from jobs.tracking.runs import get_or_create_run, git_commit, log_params_once, ray_job_id

DATA_CPUS = 1.0  # kept free: Ray Data's read tasks feed every trial's workers at its start and need a CPU


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks for: `workers` DDP workers (a GPU each with `use_gpu`) and its own driver.

    Attributes:
        workers: DDP workers per trial, or (min, max) for elastic trials (planned, and started, with max).
        use_gpu: one GPU per worker.
        cpus_per_worker: logical CPUs per worker (None: 1 on CPU, 0 with GPUs).
        trial_cpus: logical CPUs of the trial's driver, which runs the TorchTrainer.
        worker_resources: custom resources each worker reserves too, e.g. {"trainer": 1} (one worker per node
            that carries one `trainer` slot).
    """

    workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    trial_cpus: float = 1.0
    worker_resources: dict[str, float] = field(default_factory=dict)

    @property
    def worker_cpus(self) -> float:
        return self.cpus_per_worker if self.cpus_per_worker is not None else (0.0 if self.use_gpu else 1.0)

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    def demand(self) -> dict[str, float]:
        """Logical resources one running trial holds: its driver plus its workers (Tune sees only the driver);
        an elastic trial as many as its largest group."""
        return {"CPU": self.trial_cpus + self.max_workers * self.worker_cpus,
                "GPU": float(self.max_workers) if self.use_gpu else 0.0,
                **{name: self.max_workers * amount for name, amount in self.worker_resources.items()}}

    def per_worker(self) -> dict[str, float] | None:
        """What each worker reserves (ScalingConfig.resources_per_worker), None for Ray Train's default. A dict
        always names the CPUs: Ray Train reserves none that a given dict leaves out."""
        if self.cpus_per_worker is None and not self.worker_resources:
            return None
        return {"CPU": self.worker_cpus, **self.worker_resources}


def plan_concurrency(cluster: dict[str, float], resources: TrialResources, num_trials: int,
                     max_concurrent: int | None = None) -> int:
    """How many trials may run at once without one trial's workers waiting on another's forever.

    Train V2 reserves each trial's workers in a placement group Tune knows nothing about, so Tune alone
    would start a trial per free CPU and starve all of them. Here: (CPUs - DATA_CPUS) / per-trial CPUs,
    GPUs / per-trial GPUs, and the same for each custom resource the workers reserve, whichever is smallest.

    Raises:
        JobError: not even one trial fits.
    """
    demand = resources.demand()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    by_cpu = math.floor((cpus - DATA_CPUS) / demand["CPU"] + 1e-9) if demand["CPU"] else num_trials
    by_gpu = math.floor(gpus / demand["GPU"] + 1e-9) if demand["GPU"] else num_trials
    by_custom = [math.floor(cluster.get(name, 0.0) / need + 1e-9) for name, need in demand.items()
                 if name not in ("CPU", "GPU") and need]
    fits = min(by_cpu, by_gpu, *by_custom)
    gpu_each = " + 1 GPU" if resources.use_gpu else ""
    gpu_total = f", {demand['GPU']:g} GPUs" if resources.use_gpu else ""
    print(f"[tune] cluster: {cpus:g} CPUs, {gpus:g} GPUs. Each trial holds {resources.trial_cpus:g} CPU (its driver) + "
          f"{workers_text(resources.workers)} workers x {resources.worker_cpus:g} CPU{gpu_each} = {demand['CPU']:g} CPUs{gpu_total}; "
          f"{DATA_CPUS:g} CPU stays free for Ray Data.", flush=True)
    if fits < 1:
        raise JobError(
            f"one trial needs {demand['CPU']:g} CPUs{gpu_total} (+ {DATA_CPUS:g} CPU for data); the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs"
            + "".join(f", {cluster.get(name, 0.0):g} {name} (a trial needs {need:g})"
                      for name, need in demand.items() if name not in ("CPU", "GPU"))
            + ": lower --workers-per-trial, --cpus-per-worker or --trial-cpus, or add nodes"
        )
    chosen = max_concurrent or fits
    if max_concurrent and max_concurrent > fits:
        print(f"[tune] --max-concurrent {max_concurrent} is above the {fits} that fit now: trials beyond that "
              "wait for nodes (autoscaling) or for each other", flush=True)
    print(f"[tune] {num_trials} trial(s), at most {chosen} at a time", flush=True)
    return chosen


def count_trials(space: SpaceFile, num_samples: int) -> int:
    """Trials in the sweep: each sample runs once per combination of the grid values."""
    grid = math.prod(len(dist.grid) for dist in space.param_space.values() if dist.kind == "grid")
    return num_samples * grid


def build_tune_scheduler(space: SpaceFile, base: Config):
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


def sweep_eta(trials: list[tuple[str, int]], num_trials: int, total_steps: int, elapsed_s: float) -> str:
    """One line of overall sweep progress: the share of the step budget (trials x steps) done and an ETA.

    Args:
        trials: (Tune status, last reported step) of each trial started so far.
        num_trials: how many trials the sweep runs in all.
        total_steps: steps per trial.
        elapsed_s: seconds since the sweep started (this command).

    Returns:
        e.g. "[tune] progress: 45% of 8 x 600 steps (2 trials done, 3 running), elapsed 4:12, ETA <= 5:08".
        A trial an early-stopping scheduler ended counts as done, so the ETA is an upper bound.
    """
    from jobs.progress import format_seconds

    ended = sum(status in ("TERMINATED", "ERROR") for status, _ in trials)
    running = sum(status == "RUNNING" for status, _ in trials)
    budget = max(1, num_trials * total_steps)
    done = sum(total_steps if status in ("TERMINATED", "ERROR") else min(step, total_steps) for status, step in trials)
    share = done / budget
    eta = format_seconds(elapsed_s * (1 - share) / share) if share > 0 else "?"
    return (f"[tune] progress: {100 * share:.0f}% of {num_trials} x {total_steps} steps ({ended} trials done, "
            f"{running} running), elapsed {format_seconds(elapsed_s)}, ETA <= {eta}")


def _status_recorder(num_trials: int = 0, total_steps: int = 0, every_s: float = 60.0):
    import time

    from ray import tune

    class RecordTrialStatus(tune.Callback):
        """Driver-side: remember each trial's Tune status (a restored sweep unpickles its own copy), and print
        the sweep's overall progress and ETA every `every_s` seconds.

        Only during the loop: on Ctrl-C, Tune stops the running trials as TERMINATED before its end hooks,
        though they resume on a rerun.
        """

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            trial_statuses.update({trial.trial_id: trial.status for trial in trials})
            now = time.monotonic()
            start = getattr(self, "_start", None)
            if start is None:
                self._start = self._last_print = now
                return
            if num_trials and now - self._last_print >= every_s:
                self._last_print = now
                states = [(trial.status, int((trial.last_result or {}).get("step", 0) or 0)) for trial in trials]
                print(sweep_eta(states, num_trials, total_steps, now - start), flush=True)

    return RecordTrialStatus()


def trial_name(trial) -> str:
    """Trials and their folders are named by trial id (jobs.sweeps.trial recognises a donor by it)."""
    return trial.trial_id


def trial_settings(space: SpaceFile, base: Config, resources: TrialResources, sweep: str, tracking_uri: str,
                   parent_run_id: str) -> dict[str, Any]:
    """The constants every trial needs (handed to jobs.sweeps.trial.run_trial with tune.with_parameters)."""
    return {
        "base": base.model_dump(mode="json"), "searched_keys": space.searched_keys(), "sweep": sweep,
        "tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "workers_per_trial": resources.workers,
        "use_gpu": resources.use_gpu,
        "resources_per_worker": resources.per_worker(),
        "train_storage": f"{base.run.storage_path}/{sweep}-train",
    }


def build_tuner(space: SpaceFile, base: Config, sweep: str, settings: dict[str, Any], *, trial_cpus: float,
                max_concurrent: int, num_samples: int):
    """A new Tuner, or the interrupted one of the same name restored."""
    from ray import tune

    trainable = tune.with_resources(make_trainable(settings), {"CPU": trial_cpus})
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
            metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=build_tune_scheduler(space, base),
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
            callbacks=[_status_recorder(count_trials(space, num_samples), base.train.total_steps)],
        ),
    )


def start_parent_run(client, space: SpaceFile, base: Config, space_file: str, sweep: str, *,
                     workers_per_trial: int | tuple[int, int],
                     max_concurrent: int, num_samples: int) -> str:
    """The sweep's MLflow run (found again on resume), with the space file, the base config and the settings."""
    run_id, resumed = get_or_create_run(client, base.run.experiment, sweep,
                                        tags={"gan.space": space_file, "gan.kind": "sweep"})
    scheduler = space.scheduler.model_dump(exclude={"hyperparam_mutations"})
    params = {f"scheduler.{k}": v for k, v in scheduler.items()} | {
        "base": space.base, "metric": space.metric, "mode": space.mode, "search_alg": space.search_alg,
        "num_samples": num_samples, "workers_per_trial": workers_text(workers_per_trial), "max_concurrent": max_concurrent,
        "searched_keys": ",".join(space.searched_keys()),
    }
    log_params_once(client, run_id, params)
    for key, value in {"git_commit": git_commit(), "ray_job_id": ray_job_id()}.items():
        if value and value != "unknown":  # no empty tags: a local sweep has no Ray job id
            client.set_tag(run_id, key, value)
    client.log_artifact(run_id, space_file)
    client.log_text(run_id, config_to_yaml(base), "base_config.yaml")
    print(f"[tune] {'resuming' if resumed else 'starting'} sweep {sweep!r}: MLflow run {run_id}", flush=True)
    return run_id
