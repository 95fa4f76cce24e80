"""One Ray Tune trial of `jobs.tune`: a TorchTrainer (Train V2) run whose reports become Tune results + checkpoints.

Why not `ray.tune.integration.ray_train.TuneReportCallback`: it forwards metrics (and the checkpoint's
path as a metric) but gives Tune no checkpoint, so PBT has nothing to clone and a resumed sweep nothing
to restart from. Instead, `ReportToTune` (a Train UserCallback on the Train controller) hands every
report and its persisted checkpoint to this trial's function, which calls `ray.tune.report(metrics,
checkpoint=...)`; Tune copies the checkpoint into the trial's folder. The callback waits until Tune has
taken the report, so no checkpoint is deleted by Train before Tune has its copy, and a scheduler's
decision (stop, pause, exploit) happens while training waits at that report.

When Tune stops a trial (ASHA) or pauses it (PBT), the trial's actor ends its Train run before it goes
away (`make_trainable`, `stop_train_run`). Tune kills a stopping trial actor after 10 s, and the Train
controller dies with it; its workers' placement group does not (it belongs to the job). Train's own
PlacementGroupCleaner would then need the state API, which fails without a dashboard or when a stale
/tmp/ray address is around, and Train's abort itself can take ~10 s in that case (it waits for that cleaner).
So the trial gives the abort a few seconds, then removes the placement group itself (`TrackWorkerGroup`
hands it over) and kills the controller: a stopped trial never keeps CPUs or GPUs held.

A trial that starts from a Tune checkpoint (its own after a pause or a resumed sweep, or a donor's after
a PBT exploit) runs a fresh Train run seeded with it (`resume_from` in the loop config); the workers
restore it and re-apply this trial's learning rates (gan_core.loop.restore).
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray.train.v2.api.callback import UserCallback

try:  # Train's internal worker-group hooks (RunConfig accepts them next to UserCallbacks); only for cleanup
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
except ImportError:  # another Ray layout: stopped trials then rely on Train's abort alone
    WorkerGroupCallback = object

from gan_core.config import flatten
from jobs.cli import workers_text
from jobs.sweeps.space import trial_config
from jobs.tracking.runs import get_or_create_run, log_params_once
from jobs.tracking.server import hide_credentials_from_mlflow

TRIAL_ID_TAG = "gan.trial_id"
SWEEP_TAG = "gan.sweep"
PARAMS_TAG = "tune.params"  # the trial's current searched values (JSON); PBT exploits change them

ABORT_WAIT_S = 4.0  # how long a stopping trial lets Train abort by itself (Tune kills the trial actor at 10 s)

# The Train run this trial actor is driving ({"controller", "acks", "placement_group"}); one trial per actor.
_live_run: dict[str, Any] = {}
# On the Train controller: its current worker group's placement group (set by TrackWorkerGroup).
_controller_workers: dict[str, Any] = {}


def _this_run() -> dict[str, Any]:
    """On the Train controller: what a stopped trial needs to end this run (controller, workers' placement group)."""
    import ray

    return {"controller": ray.get_runtime_context().current_actor,
            "placement_group": _controller_workers.get("placement_group")}


class TrackWorkerGroup(WorkerGroupCallback):
    """Runs on the Train controller: tell the trial about each worker group it starts (its placement group),
    so that a trial stopped even before its first report can end the run."""

    def __init__(self, inbox):
        self.inbox = inbox

    def after_worker_group_start(self, worker_group) -> None:
        from ray.util.queue import Full

        state = worker_group.get_worker_group_state()
        handle = getattr(state, "placement_group_handle", None)
        _controller_workers["placement_group"] = getattr(handle, "placement_group", None) or getattr(
            state, "placement_group", None)
        try:
            self.inbox.put((None, None, _this_run()), timeout=30)  # (no metrics: not a report)
        except Full:  # the trial is not reading (it is going away); its reports will carry the same
            pass


class ReportToTune(UserCallback):
    """Runs on the Train controller: pass each report (rank 0's metrics, the checkpoint) to the trial function."""

    def __init__(self, inbox, acks):
        self.inbox, self.acks = inbox, acks  # ray.util.queue.Queue handles, picklable

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.inbox.put((dict(metrics[0]), checkpoint, _this_run()))
        # Hold the controller until Tune has the report: Train may delete this checkpoint after the next one.
        self.acks.get()


def trial_callbacks(inbox, acks) -> list:
    """The Train callbacks of a trial's TorchTrainer."""
    return [ReportToTune(inbox, acks)] + ([TrackWorkerGroup(inbox)] if WorkerGroupCallback is not object else [])


def make_trainable(settings: dict[str, Any]):
    """The Tune trainable: `run_trial` as a function trainable whose cleanup first aborts the Train run.

    Tune calls cleanup when it stops or pauses a trial, just before the actor exits; the Train controller
    is owned by that actor and would die with it without removing its workers' placement group.
    """
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    function_trainable = wrap_function(tune.with_parameters(run_trial, settings=settings))

    class SweepTrial(function_trainable):
        def cleanup(self):
            stop_train_run()
            super().cleanup()

    return SweepTrial


def stop_train_run(abort_wait_s: float = ABORT_WAIT_S) -> None:
    """End the Train run of this trial actor, if one is running, so that its workers' resources are free.

    First Train's own abort (workers shut down, placement group removed, run marked aborted); if that takes
    longer than `abort_wait_s`, remove the placement group (which ends the workers) and kill the controller.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.placement_group import remove_placement_group
    from ray.util.queue import Full

    live = dict(_live_run)
    _live_run.clear()
    if not live:
        return
    try:
        live["acks"].put_nowait(False)  # release the controller if it waits in ReportToTune.after_report
    except (Full, RayActorError):  # it is not waiting, or it is gone already
        pass
    try:
        ray.get(live["controller"].abort.remote(), timeout=abort_wait_s)
        return
    except RayActorError:  # abort ends with the controller exiting: its callers see the actor die
        return
    except GetTimeoutError:
        pass
    group = live.get("placement_group")
    if group is not None:
        remove_placement_group(group)
    ray.kill(live["controller"], no_restart=True)
    released = "removed its workers' placement group" if group is not None else "its workers wait for Ray's cleaner"
    print(f"[tune] the Train run did not abort within {abort_wait_s:g} s: killed its controller and {released}",
          flush=True)


def run_trial(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """The Tune function: one trial of the sweep, run as DDP training with `settings["workers_per_trial"]` workers
    (a (min, max) pair: an elastic group, as jobs.train --num-workers MIN-MAX).

    Args:
        config: this trial's searched values, dotted keys (what the searcher / PBT chose).
        settings: the sweep's constants (see jobs.sweeps.tuner.trial_settings).
    """
    import ray.data
    import ray.tune
    from ray.util.queue import Queue

    from jobs.training.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    ray.data.DataContext.get_current().enable_progress_bars = False  # as in jobs.cli.init_ray, per process
    params = {key: config[key] for key in settings["searched_keys"] if key in config}
    cfg = trial_config(settings["base"], params, source=f"trial {trial_id} ({params})")

    # 1. The trial's MLflow run, nested under the sweep; found again when the trial restarts.
    hide_credentials_from_mlflow(settings["tracking_uri"])  # this process ends the run: MLflow would print the URI
    client = MlflowClient(settings["tracking_uri"])
    run_id, _ = get_or_create_run(
        client, cfg.run.experiment, f"{settings['sweep']}/{trial_id}",
        tags={"mlflow.parentRunId": settings["parent_run_id"], SWEEP_TAG: settings["sweep"], TRIAL_ID_TAG: trial_id},
    )
    # 2. Where this start continues from: nothing, this trial's last report, or a PBT donor's.
    checkpoint = ray.tune.get_checkpoint()
    origin = checkpoint.get_metadata() if checkpoint is not None else {}
    if origin and origin.get("trial_id") != trial_id:
        log_exploit(client, settings, trial_id, run_id, origin, params)
    elif origin:
        print(f"[tune] trial {trial_id} resumes its own checkpoint at step {origin.get('step')}", flush=True)
    client.set_tag(run_id, PARAMS_TAG, json.dumps(params))
    params_to_log = flatten(cfg.model_dump(mode="json")) | {"num_workers": workers_text(settings["workers_per_trial"])}
    log_params_once(client, run_id, params_to_log)  # after an exploit, changed values become resume.override.* tags

    # 3. A fresh Train run per start, so Train never restores a stale run of this trial by name.
    train_storage = settings["train_storage"]  # a str: Path() would fold s3://bucket into s3:/bucket
    _remove_previous_train_runs(train_storage, trial_id)
    cfg = cfg.with_values({"run.storage_path": train_storage, "run.name": f"{trial_id}-{uuid.uuid4().hex[:6]}"})
    exploited = bool(origin) and origin.get("trial_id") != trial_id
    # After an exploit the trial trains the steps since the donor's checkpoint again, with other values: its
    # MLflow history gets the new points; a trial resuming its own checkpoint skips the steps it already logged.
    loop_config = {"config": cfg.model_dump(mode="json"), "tracking_uri": settings["tracking_uri"],
                   "run_id": run_id, "resume_from": checkpoint, "skip_logged_steps": not exploited}
    inbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, num_workers=settings["workers_per_trial"], use_gpu=settings["use_gpu"],
                            loop_config=loop_config, callbacks=trial_callbacks(inbox, acks),
                            resources_per_worker=settings["resources_per_worker"])
    # 4. Train in a helper thread; this (Tune's) thread reports. When Tune stops or pauses the trial,
    #    ray.tune.report never returns here: SweepTrial.cleanup aborts the Train run and the actor exits.
    forward_reports(trainer, inbox, acks, {"trial_id": trial_id, "params": params})
    final = ray.tune.get_checkpoint()
    if final is not None:
        from jobs.tracking.model_source import checkpoint_uri

        client.set_tag(run_id, "checkpoint_location", checkpoint_uri(final))
    client.set_terminated(run_id, status="FINISHED")


def forward_reports(trainer, inbox, acks, metadata: dict[str, Any]) -> None:
    """Run `trainer.fit()` in a thread and turn each report it makes into `ray.tune.report`.

    Raises:
        Whatever `trainer.fit()` raised (Tune then marks the trial as errored).
    """
    import ray.tune

    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 -- handed to the Tune thread, which raises it
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while True:
        try:
            metrics, train_checkpoint, run = inbox.get(timeout=1.0)
        except queue.Empty:
            # The callback waits for its ack, so a finished fit() has no report left in the queue.
            if thread.is_alive():
                continue
            break
        _live_run.update(run, acks=acks)
        if metrics is None:  # the run's workers started: nothing to report yet
            continue
        checkpoint = None
        if train_checkpoint is not None:
            train_checkpoint.set_metadata(metadata | {"step": metrics.get("step")})
            checkpoint = ray.tune.Checkpoint(train_checkpoint.path, filesystem=train_checkpoint.filesystem)
        ray.tune.report(metrics, checkpoint=checkpoint)
        acks.put(True)
    thread.join()
    _live_run.clear()
    if "error" in outcome:
        raise outcome["error"]


def log_exploit(client: MlflowClient, settings: dict[str, Any], trial_id: str, run_id: str,
                origin: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Say loudly that PBT restarted `trial_id` from a donor's checkpoint, with old and new values.

    Logged to stdout, on the trial's MLflow run (a tag per exploit and the `tune/exploits` count at the step)
    and on the sweep's run (`exploits/<trial>_step<N>.json`).

    Returns:
        The exploit record.
    """
    old = json.loads(client.get_run(run_id).data.tags.get(PARAMS_TAG, "{}"))
    step = int(origin.get("step") or 0)
    record = {
        "trial": trial_id, "donor": origin.get("trial_id"), "step": step,
        "old": old, "donor_values": origin.get("params", {}), "new": params,
    }
    changes = ", ".join(f"{key} {old.get(key, '?')} -> {value}" for key, value in params.items())
    print(f"[pbt] exploit: trial {trial_id} restarts from trial {record['donor']}'s checkpoint at step {step}: "
          f"{changes}", flush=True)
    previous = [key for key in client.get_run(run_id).data.tags if key.startswith("tune.exploit.")]
    client.set_tag(run_id, f"tune.exploit.{len(previous) + 1}", json.dumps(record)[:5000])
    client.log_metric(run_id, "tune/exploits", len(previous) + 1, step=step)
    client.log_dict(settings["parent_run_id"], record, f"exploits/{trial_id}_step{step:07d}.json")
    return record


def _remove_previous_train_runs(storage: str, trial_id: str) -> None:
    # Earlier starts of this trial are superseded by the Tune checkpoints (Tune holds its own copies).
    # On S3 they stay (a few small folders per exploit); only a local folder is cleaned.
    if "://" in storage or not Path(storage).is_dir():
        return
    storage = Path(storage)
    for old in storage.glob(f"{trial_id}-*"):
        shutil.rmtree(old, ignore_errors=True)
