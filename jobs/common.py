"""Plumbing shared by the jobs: where MLflow is, joining or starting Ray, tags."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# A tracking server that went away must not stall training for minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Ray Train V2 routes print() into its logger as well as stdout: every progress line would show twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


class JobError(RuntimeError):
    """A problem the user must fix (bad path, unreachable server); printed without a traceback."""


def resolve_tracking_uri(cli_value: str | None) -> str:
    """`--tracking-uri`, else $MLFLOW_TRACKING_URI, else SQLite in the working directory.

    A relative SQLite path is made absolute, so Ray workers (whose working directory differs)
    write to the same database as the driver.
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when an HTTP tracking server does not answer.

    Raises:
        JobError: the server is unreachable or unhealthy.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = f"is unreachable ({getattr(err, 'reason', err)})"
    raise JobError(
        f"MLflow tracking server {uri} {problem}. Start it (mlflow server --host 127.0.0.1 --port 5000 "
        f"--backend-store-uri sqlite:///mlflow.db), fix --tracking-uri / MLFLOW_TRACKING_URI, or leave both unset "
        f"to use the local SQLite store {DEFAULT_TRACKING_URI}."
    )


def init_ray(num_cpus_hint: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (or a running `ray job`), else start a local Ray.

    Locally, Ray is told about at least `num_cpus_hint` logical CPUs: training workers each hold one,
    and Ray Data's readers need a slot of their own or they wait forever on a small laptop.
    """
    import ray
    import ray.data

    # Per-row progress bars from Ray Data drown the training log; the job prints its own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    cpus = max(os.cpu_count() or 1, num_cpus_hint or 0)
    # address="local": a fresh local cluster, never a stale one that /tmp/ray remembers.
    ray.init(address="local", num_cpus=cpus, log_to_driver=True)


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
    import json

    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        config = {}
    return (config.get("metadata") or {}).get("job_submission_id", "") or os.environ.get("RAY_JOB_SUBMISSION_ID", "")


def run_main(main) -> None:
    """Call `main()`, turning user-facing errors into one clear line and exit status 2."""
    from gan_core.config import ConfigError

    try:
        main()
    except (JobError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
