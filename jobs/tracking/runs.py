"""MLflow runs: one run per training run (found again on resume), logging that never stops training,
and the tags every run carries.

When the server goes away mid-run, each failed logging call is counted and said loudly, and the count
is printed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from jobs.tracking.server import fail_fast_http

RUN_NAME_TAG = "gan.run_name"
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


def get_or_create_run(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """The id of the MLflow run for `run_name` in `experiment`, creating either when missing.

    Returns:
        (run_id, resumed): resumed is True when the run already existed (a rerun of the same name).
    """
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id, False


class RunLogger:
    """Rank 0's handle on its MLflow run; every call survives an unreachable server."""

    def __init__(self, tracking_uri: str, run_id: str):
        fail_fast_http()  # in this (worker) process too: a lost server costs seconds per call, not minutes
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.failures = 0

    def _try(self, what: str, call, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:  # the server may be down; training goes on
            self.failures += 1
            print(
                f"!! MLflow at {self.tracking_uri} failed to log {what} ({type(err).__name__}: {str(err)[:160]}); "
                f"{self.failures} logging call(s) lost so far, training continues",
                file=sys.stderr,
                flush=True,
            )

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in values.items()]
        self._try(f"{len(batch)} metrics at step {step}", self.client.log_batch, self.run_id, metrics=batch)

    def image(self, image, artifact_file: str) -> None:
        self._try(artifact_file, self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def sample_grid(self, image, step: int) -> None:
        """A validation sample grid, as `samples/step_<step>.png`."""
        self.image(image, f"samples/step_{step:07d}.png")

    def say_failures(self) -> None:
        """At the end of a run: how many logging calls were lost, if any."""
        if self.failures:
            print(f"!! {self.failures} MLflow logging call(s) failed during this run; see the messages above",
                  file=sys.stderr, flush=True)

    def text(self, text: str, artifact_file: str) -> None:
        self._try(artifact_file, self.client.log_text, self.run_id, text, artifact_file)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._try(f"tag {key}", self.client.set_tag, self.run_id, key, str(value))


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
