"""MLflow runs: one run per training run (found again on resume), its lifecycle (closed FINISHED, FAILED or
KILLED whatever ends the job), logging that never stops training, and the tags every run carries.

    run_id, resumed = get_or_create_run(client, experiment, run_name, tags={})
    with run_lifecycle(client, run_id, tracking_uri=uri):   # SIGINT / SIGTERM raise RunInterrupted in here
        ...train...                                         # FINISHED, FAILED (+ failure tags) or KILLED

Rank 0 logs through `RunLogger`. When the server goes away mid-run, metric points are spooled and re-sent,
in order, once it answers again; at the end of the run what is left is flushed for a bounded time, and
what could not be sent is counted and said. Each (key, step) is logged once, also when a resumed or
restarted run replays the steps since its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from jobs.tracking.server import fail_fast_http, redact_text, redact_uri

RUN_NAME_TAG = "gan.run_name"
FAILURE_TAG = "failure"  # why the run ended FAILED or KILLED: non_finite_loss, interrupted, an exception's name
# Tags a failed, killed or unfinished attempt leaves; a later attempt that finishes removes them.
FAILURE_TAGS = (FAILURE_TAG, "failure.step", "failure.signal", "failure.message", "final_model_pending")
CLOSE_WAIT_S = 20.0  # how long closing a run retries an unreachable server (a SIGTERM leaves ~30 s on Kubernetes)
RETRY_PAUSE_S = 2.0


def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout (e.g. a `ray job submit` working dir)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ray_job_id() -> str:
    """The Ray job submission id (`raysubmit_...`) when run through `ray job submit`, else ''.

    Ray 2.60 hands it to the entrypoint inside the job config JSON (metadata.job_submission_id).
    """
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        config = {}
    return (config.get("metadata") or {}).get("job_submission_id", "") or os.environ.get("RAY_JOB_SUBMISSION_ID", "")


def _local_artifact_location(client: MlflowClient) -> str | None:
    """For a SQLite store in a `ray job submit` job: artifacts beside it under jobs.cli.job_home(). MLflow's
    default, ./mlruns, would be Ray's temporary copy of the working dir. None (MLflow's default) otherwise."""
    from jobs.cli import job_home, ray_job_copy

    if ray_job_copy() is None or not str(client.tracking_uri).startswith("sqlite:"):
        return None
    return (job_home() / "mlruns").as_uri()


def get_or_create_run(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """The id of the MLflow run for `run_name` in `experiment`, creating either when missing.

    Returns:
        (run_id, resumed): resumed is True when the run already existed (a rerun of the same name).
    """
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_local_artifact_location(client))
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id, False


# -- the run's lifecycle -------------------------------------------------------------------------------


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the job. A KeyboardInterrupt, so `except Exception` lets it through.

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
        exit_code: what the job should exit with, 128 + the signal number (130, 143), as a shell reports it.
    """

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


@contextmanager
def run_lifecycle(client: MlflowClient, run_id: str, *, tracking_uri: str,
                  close_wait_s: float = CLOSE_WAIT_S) -> Iterator[None]:
    """Close the MLflow run however the block ends: FINISHED when it returns, FAILED when it raises, KILLED on
    SIGINT or SIGTERM, so that no run is left RUNNING by a job that has stopped.

    While the block runs, SIGINT and SIGTERM raise `RunInterrupted` in the main thread (further signals are
    ignored while the run is closed). A failure's tags come from the exception: `failure` (its class name, or
    its `mlflow_tags`, e.g. `{"failure": "non_finite_loss", "failure.step": "7"}`) and `failure.message`.
    An unreachable server is retried for `close_wait_s`; then a clear line says the run could not be closed.

    Raises:
        Whatever the block raised, after the run is closed (RunInterrupted for a signal).
    """
    with _signals_interrupt() as closing:
        try:
            yield
        except KeyboardInterrupt as stop:  # RunInterrupted (a signal), or Ctrl-C before the handlers were in
            closing.set()
            signal_name = getattr(stop, "signal_name", "SIGINT")
            close_run(client, run_id, "KILLED", {FAILURE_TAG: "interrupted", "failure.signal": signal_name},
                      tracking_uri=tracking_uri, wait_s=close_wait_s)
            raise
        except BaseException as err:
            closing.set()
            close_run(client, run_id, "FAILED", failure_tags(err), tracking_uri=tracking_uri, wait_s=close_wait_s)
            raise
        closing.set()
        close_run(client, run_id, "FINISHED", {}, tracking_uri=tracking_uri, wait_s=close_wait_s,
                  remove_tags=FAILURE_TAGS)


def failure_tags(err: BaseException) -> dict[str, str]:
    """The tags of a run that failed with `err`: its class name and message, overridden by its `mlflow_tags`."""
    return {FAILURE_TAG: type(err).__name__, "failure.message": redact_text(str(err))[:1000],
            **getattr(err, "mlflow_tags", {})}


@contextmanager
def _signals_interrupt() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM raise RunInterrupted in the main thread, until the yielded event is set (the run
    is being closed: a second Ctrl-C must not cut that short); the previous handlers come back at the end.
    Outside the main thread (Python allows handlers only there) nothing is installed."""
    closing = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield closing
        return

    def interrupt(signum: int, frame) -> None:
        if closing.is_set():
            print(f"{signal.Signals(signum).name}: closing the MLflow run, then exiting", file=sys.stderr, flush=True)
            return
        closing.set()  # one interruption; later signals are reported, not raised
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield closing
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def close_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, str], *, tracking_uri: str,
              wait_s: float = CLOSE_WAIT_S, remove_tags: tuple[str, ...] = ()) -> bool:
    """Set `tags`, remove `remove_tags` where present, and mark the run `status`; an unreachable server is
    retried for `wait_s` seconds.

    Returns:
        True when the run was closed; False (after a clear line on stderr) when the server never answered.
    """
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        tries += 1
        try:
            if tags:
                client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
            if remove_tags:
                present = client.get_run(run_id).data.tags
                for key in remove_tags:
                    if key in present:
                        client.delete_tag(run_id, key)
            client.set_terminated(run_id, status=status)
        except Exception as err:  # noqa: BLE001 -- the server may be down: retry for a while, then say so
            if time.monotonic() + RETRY_PAUSE_S > deadline:
                print(f"!! could not mark MLflow run {run_id} {status} at {redact_uri(tracking_uri)} after {tries} "
                      f"tries ({type(err).__name__}: {redact_text(str(err))[:200]}); it shows RUNNING there until "
                      "the same command is rerun (same --name) or the run is closed by hand",
                      file=sys.stderr, flush=True)
                return False
            if tries == 1:
                print(f"!! MLflow at {redact_uri(tracking_uri)} does not answer ({type(err).__name__}); retrying "
                      f"for up to {wait_s:.0f} s to mark run {run_id} {status}", file=sys.stderr, flush=True)
            time.sleep(RETRY_PAUSE_S)
            continue
        if tries > 1:
            print(f"MLflow run {run_id} marked {status} (after {tries} tries)", file=sys.stderr, flush=True)
        return True


# -- logging from rank 0 -------------------------------------------------------------------------------


class RunLogger:
    """Rank 0's handle on its MLflow run; every call survives an unreachable server.

    Metric points go through a spool: points the server did not take stay queued (at most `max_spooled`;
    beyond that the oldest are dropped and counted) and are re-sent, oldest first, by the next logging call
    once the server answers; while it does not, it is asked again at most every `retry_after_s` seconds, so
    an outage does not slow training down. `close` flushes what is left. With `skip_logged_steps`, points at
    a step the run already holds for that key (a resumed or restarted run replays the steps since its
    checkpoint) are skipped; a PBT exploit turns it off, since its trial really trains those steps again.
    Images and tags are not spooled: a failed call is counted and said.
    """

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, tracking_uri: str, run_id: str, *, max_spooled: int = 100_000, retry_after_s: float = 5.0,
                 skip_logged_steps: bool = True):
        fail_fast_http()  # in this (worker) process too: a lost server costs seconds per call, not minutes
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.failures = 0  # image and tag calls lost
        self.spool: deque[Metric] = deque()
        self.max_spooled = max_spooled
        self.dropped = 0  # points pushed out of a full spool
        self.retry_after_s = retry_after_s
        # The last step per key the run already holds (MLflow's "latest" metric is the one at the highest
        # step); read at the first contact, and again after a failed one.
        self.logged_up_to: dict[str, int] | None = None
        self.skip_logged_steps = skip_logged_steps
        self._retry_at = 0.0
        self._down_since: float | None = None

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.spool.extend(Metric(key, float(value), now, step) for key, value in values.items())
        if len(self.spool) > self.max_spooled:
            excess = len(self.spool) - self.max_spooled
            for _ in range(excess):
                self.spool.popleft()
            if not self.dropped:
                print(f"!! more than {self.max_spooled} metric points wait for MLflow at "
                      f"{redact_uri(self.tracking_uri)}: the oldest are dropped from now on", file=sys.stderr,
                      flush=True)
            self.dropped += excess
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send the spooled points, oldest first, unless the server failed less than `retry_after_s` ago
        (`force` asks anyway).

        Returns:
            True when nothing is left in the spool.
        """
        if not self.spool:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        sent = 0
        try:
            if self.logged_up_to is None:
                self.logged_up_to = last_logged_steps(self.client, self.run_id) if self.skip_logged_steps else {}
            while self.spool:
                count = min(len(self.spool), self.MAX_BATCH)
                batch, last = [], dict(self.logged_up_to)
                for point in (self.spool[i] for i in range(count)):
                    if point.step > last.get(point.key, -1):
                        batch.append(point)
                        last[point.key] = point.step
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
                for _ in range(count):
                    self.spool.popleft()
                self.logged_up_to = last
                sent += len(batch)
        except Exception as err:  # noqa: BLE001 -- the server may be down: keep the points, training goes on
            self._retry_at = time.monotonic() + self.retry_after_s
            # A request that timed out may still have been written: read the run's last steps again first.
            self.logged_up_to = None
            if self._down_since is None:
                self._down_since = time.monotonic()
                print(f"!! MLflow at {redact_uri(self.tracking_uri)} failed to log metrics ({type(err).__name__}: "
                      f"{redact_text(str(err))[:160]}); the points are kept and re-sent when it answers, "
                      "training continues",
                      file=sys.stderr, flush=True)
            return False
        if self._down_since is not None:
            print(f"MLflow at {redact_uri(self.tracking_uri)} answers again after "
                  f"{time.monotonic() - self._down_since:.0f} s: re-sent {sent} spooled metric points",
                  file=sys.stderr, flush=True)
            self._down_since = None
        return True

    def close(self, wait_s: float = 60.0) -> int:
        """At the end of a run: flush the spool, retrying an unreachable server for up to `wait_s` seconds,
        then say how many metric points and other logging calls were lost, if any.

        Returns:
            The number of metric points lost.
        """
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and time.monotonic() + RETRY_PAUSE_S < deadline:
            time.sleep(RETRY_PAUSE_S)
        lost = len(self.spool) + self.dropped
        if lost:
            print(f"!! {lost} metric point(s) could not be logged to MLflow at {redact_uri(self.tracking_uri)} "
                  f"(it did not answer within {wait_s:.0f} s at the end of the run); they are lost",
                  file=sys.stderr, flush=True)
        if self.failures:
            print(f"!! {self.failures} MLflow logging call(s) (images, tags) failed during this run; see the "
                  "messages above", file=sys.stderr, flush=True)
        return lost

    def _try(self, what: str, call, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:  # the server may be down; training goes on
            self.failures += 1
            print(
                f"!! MLflow at {redact_uri(self.tracking_uri)} failed to log {what} ({type(err).__name__}: "
                f"{redact_text(str(err))[:160]}); {self.failures} logging call(s) lost so far, training continues",
                file=sys.stderr,
                flush=True,
            )

    def image(self, image, artifact_file: str) -> None:
        self._try(artifact_file, self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def sample_grid(self, image, step: int) -> None:
        """A validation sample grid, as `samples/step_<step>.png`."""
        self.image(image, f"samples/step_{step:07d}.png")

    def text(self, text: str, artifact_file: str) -> None:
        self._try(artifact_file, self.client.log_text, self.run_id, text, artifact_file)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._try(f"tag {key}", self.client.set_tag, self.run_id, key, str(value))


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step the run holds for each metric key: one request (MLflow keeps each key's latest
    metric, the one at the highest step, with the run)."""
    return {metric.key: metric.step for metric in client.get_run(run_id).data.to_proto().metrics}


def log_params_once(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params on a new run; on a resumed run, record changed values as tags (params are immutable)."""
    logged = client.get_run(run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in logged}
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != str(v)}
    for start in range(0, len(fresh), 90):  # MLflow takes at most 100 params per batch
        chunk = list(fresh.items())[start : start + 90]
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in chunk])
    for key, value in changed.items():
        client.set_tag(run_id, f"resume.override.{key}", f"{logged[key]} -> {value}")
