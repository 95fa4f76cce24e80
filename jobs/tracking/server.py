"""Where the MLflow tracking server is: `--tracking-uri`, the environment, or the local SQLite default.

A server that runs MLflow's basic-auth app (cluster.yaml) takes its credentials from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment: MLflow sends them with every
request. A `user:password@` in the URI works too, but every line the jobs print shows it through
`redact_uri`, and `connect` warns that MLflow's own error messages would still show it.

No MLflow import at module level: every job's `--help` stays fast.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request

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


_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*):[^\s/@]+@")


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` in `text` as `scheme://user:***@`: for error messages and tags that quote
    a URI whatever its origin (MLflow's exceptions, requests' errors, our own lines)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:***@", text)


def without_password(text: str, uri: str) -> str:
    """`text` with the password of `uri` replaced by `***`: for error messages, which MLflow writes with the
    URI as given (`API request to http://user:secret@host/api/2.0/... failed`)."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text


def hide_credentials_from_mlflow(uri: str) -> None:
    """With a password (or token query) in `uri`, stop MLflow from printing it: every run MLflow ends prints
    `View run ... at: <uri>/#/experiments/...` to stdout, the URI as given. Call in each process that ends
    runs (a job's driver through `connect`, a sweep's trial processes)."""
    if redact_uri(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def resolve_tracking_uri(cli_value: str | None) -> str:
    """`--tracking-uri`, else $MLFLOW_TRACKING_URI, else SQLite in the working directory.

    A relative SQLite path is made absolute, so Ray workers (whose working directory differs)
    write to the same database as the driver.
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        from jobs.cli import resolve_local_path

        uri = prefix + str(resolve_local_path(uri[len(prefix) :], "the MLflow store sqlite:///"))
    return uri


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when an HTTP tracking server does not answer.

    Only reachability is checked: /health needs no credentials, so wrong ones show at the first request.

    Raises:
        JobError: the server is unreachable or unhealthy (the message shows `uri` without its password).
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(_health_url(uri), timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = f"is unreachable ({getattr(err, 'reason', err)})"
    raise JobError(
        f"MLflow tracking server {redact_uri(uri)} {problem}. Start it (mlflow server --host 127.0.0.1 --port 5000 "
        f"--backend-store-uri sqlite:///mlflow.db), fix --tracking-uri / MLFLOW_TRACKING_URI, or leave both unset "
        f"to use the local SQLite store {DEFAULT_TRACKING_URI}."
    )


def _health_url(uri: str) -> str:
    """The server's /health endpoint, without any `user:password@` of `uri`: urllib would take it for part of
    the host name, and the basic-auth app answers /health without credentials anyway."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))


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
    if redact_uri(uri) != uri:
        # MLflow's own errors (`API request to <uri>/api/... failed`) and Ray's tracebacks of them show it in full.
        print(f"warning: the tracking URI {redact_uri(uri)} carries credentials, which MLflow's error messages "
              "print in full: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead", file=sys.stderr,
              flush=True)
        hide_credentials_from_mlflow(uri)
    if check:
        check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri
