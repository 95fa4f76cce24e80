"""Real components for the job tests: a local Ray cluster, and the helpers behind the session's `mlflow server`
(the `mlflow_server` and `demo_data` fixtures live in tests/conftest.py: every folder shares one of each)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# `mlflow server` starts a job runner with ~8 worker processes by default; the tests use no server-side jobs,
# and on 2 cores those processes slow every test that starts a server.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 90.0, any_status: bool = False) -> None:
    """Poll until `url` answers 200 (or any HTTP status with any_status, e.g. 401 from a token-protected
    Ray dashboard)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.5)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` (SQLite store under root) in its own process group; return it and its URI."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,  # the server forks uvicorn: stopping it means stopping the whole group
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health")
    return process, uri


def stop_process_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal a process started with start_new_session=True and all its children; wait for it up to `timeout`
    seconds, then SIGKILL the group."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray cluster for the session (4 logical CPUs: 2 trainers, data, headroom).

    Its processes get the S3 server's AWS_* variables (tests/conftest.py), as a cluster's nodes get them from the
    environment `ray start` runs in: a worker's environment is fixed when Ray starts, so any test may then use
    `run.storage_path=s3://...`."""
    import ray

    os.environ.update(s3_server.env)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # address="local": always a fresh cluster, never one that /tmp/ray says was started earlier.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def tiny_overrides(demo_data: Path, storage: Path, steps: int = 6, **extra: str) -> list[str]:
    """Overrides that shrink the demo recipe to seconds: a 1-block G, 32 px patches, 2 validation crops."""
    values = {
        "data.train": str(demo_data / "train_shards"),
        "data.val": str(demo_data / "val"),
        "data.patch_size": "32",
        "data.batch_size": "2",
        "data.val_crop": "64",
        "data.max_val_images": "2",
        "generator.num_feat": "8",
        "generator.num_block": "1",
        "generator.num_grow_ch": "8",
        "discriminator.num_feat": "8",
        "train.total_steps": str(steps),
        "train.pretrain_steps": "2",
        "train.log_every": "1",
        "train.val_every": "2",
        "train.ckpt_every": "2",
        "run.storage_path": str(storage),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
