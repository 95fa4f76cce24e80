"""Where the MLflow tracking server is: `--tracking-uri`, the environment, or the local SQLite default.

No MLflow import at module level: every job's `--help` stays fast.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from jobs.cli import JobError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_HELP = "MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


def redact_uri(uri: str) -> str:
    """`uri` with any password replaced by `***` (`http://user:secret@host` -> `http://user:***@host`): for every
    line a job prints or logs. Query strings that carry tokens (`?token=...`, `?X-Amz-...`) are dropped."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return uri  # nothing secret; urlunsplit would also mangle sqlite:////abs/path
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in credentials else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))


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


def fail_fast_http() -> None:
    """A tracking server that went away must not stall this process for minutes of MLflow's retries: one retry,
    10 s timeout (defaults only; the user's environment wins). Read by MLflow at each request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def connect(cli_value: str | None, check: bool = True) -> str:
    """Resolve the tracking URI, check the server when `check` (fail before any work), and make it
    MLflow's default for this process. Returns the URI."""
    import mlflow

    fail_fast_http()
    uri = resolve_tracking_uri(cli_value)
    if check:
        check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri
