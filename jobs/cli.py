"""What every command-line job shares: user errors and exit codes, and joining or starting Ray."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class JobError(RuntimeError):
    """A problem the user must fix (bad path, unreachable server); printed without a traceback."""


def ray_job_copy() -> Path | None:
    """The folder this process runs in when it is the entrypoint of `ray job submit --working-dir`, else None.

    Ray 2.60 unpacks the uploaded working dir into `<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>`
    and starts the entrypoint there. That copy is temporary, and it lacks whatever .gitignore ignores (data/).
    """
    cwd = Path.cwd()
    return cwd if "working_dir_files" in cwd.parts or cwd.name.startswith("_ray_pkg_") else None


def job_home() -> Path:
    """Where a submitted job keeps what would otherwise land in Ray's temporary copy of the working dir
    (relative run.storage_path, the default SQLite MLflow store): $GAN_ENHANCE_HOME, else ~/gan-enhance on
    the node that runs the job driver (the head, for `ray job submit`)."""
    return Path(os.environ.get("GAN_ENHANCE_HOME") or "~/gan-enhance").expanduser()


def resolve_local_path(value: str, what: str) -> Path:
    """A relative output path made absolute: against the working directory, or, inside a submitted job's
    temporary copy of it, against job_home() (said once on stdout, so the user knows where to look)."""
    path = Path(value)
    if path.is_absolute():
        return path
    if ray_job_copy() is None:
        return path.resolve()
    resolved = job_home() / path
    resolved.parent.mkdir(parents=True, exist_ok=True)
    print(f"{what}={value} is relative and this is a `ray job submit` job, whose working dir is a temporary copy: "
          f"using {resolved} (set GAN_ENHANCE_HOME, or pass an absolute path or s3://...)", flush=True)
    return resolved


def configure_environment() -> None:
    """Settings every job wants before Ray starts (defaults only: the user's environment wins)."""
    # Ray Train V2 routes print() into its logger as well as stdout: every progress line would show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def init_ray(num_cpus_hint: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (or a running `ray job`), else start a local Ray.

    Locally, Ray is told about at least `num_cpus_hint` logical CPUs: training workers each hold one,
    and Ray Data's readers need a slot of their own or they wait forever on a small laptop.
    """
    configure_environment()
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


def run_main(main) -> None:
    """Call `main()`, turning user-facing errors into one clear line and exit status 2."""
    from gan_core.config import ConfigError

    configure_environment()
    try:
        main()
    except (JobError, ConfigError, FileNotFoundError) as err:
        from jobs.tracking.server import redact_text

        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        sys.exit(2)


def worker_count(text: str) -> int | tuple[int, int]:
    """`--num-workers` / `--workers-per-trial`: "N" (a fixed group), or "MIN-MAX" (elastic) with 1 <= MIN <= MAX."""
    low, dash, high = text.partition("-")
    try:
        low_n, high_n = int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither N nor MIN-MAX (e.g. 2 or 1-4)") from None
    if low_n < 1 or high_n < low_n:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 1 <= MIN <= MAX (at least 1 worker)")
    return (low_n, high_n) if dash else low_n


def workers_text(workers: int | tuple[int, int]) -> str:
    """2 -> "2", (1, 4) -> "1-4" (how a worker count is logged and printed)."""
    return "-".join(map(str, workers)) if isinstance(workers, tuple) else str(workers)


def json_resources(text: str) -> dict[str, float]:
    """`--resources-per-worker`: a JSON object of resource names to amounts."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise argparse.ArgumentTypeError('expected an object of amounts, e.g. {"CPU": 1, "trainer": 1}')
    return value


def with_default_cpus(resources: dict[str, float] | None, use_gpu: bool) -> dict[str, float] | None:
    """`--resources-per-worker` with Ray Train's default CPUs (1 per CPU worker, 0 per GPU worker) when it names
    none: Ray Train reserves no CPU that a given dict leaves out, so '{"trainer": 1}' alone would put any number
    of workers on a node's CPUs."""
    if resources is None or "CPU" in resources:
        return resources
    return {"CPU": 0.0 if use_gpu else 1.0, **resources}
