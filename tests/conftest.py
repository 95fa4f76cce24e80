"""Session fixtures shared by every test folder: real servers from tests/servers.py, one `mlflow server`, the demo
data. One of each for the whole session: tests/jobs, tests/cluster and tests/reliability each started their own
before (a server start and a demo-shard write cost ~10 s each on 2 cores)."""

from __future__ import annotations

import os

import pytest

from tests.servers import S3Server, start_postgres, start_s3_server, stop_group, stop_postgres

# Ray Train settings for every Train run the tests start, in this process and in the subprocesses and `ray start`
# nodes that inherit its environment (a user's environment still wins). Measured on 2 cores: a few seconds less
# per run, and the suite starts ~30 of them.
# - The controller polls its workers every 2 s by default: a run's end, and each checkpoint, is noticed up to 2 s
#   late. Every 0.5 s costs nothing measurable with the tests' 1-2 workers.
# - The preemption watcher (one more actor process per run, polling for node drains) has nothing to watch on
#   this machine: no test drains a node (node loss is a SIGKILL, which Train's health checks handle).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (`moto_server`) on 127.0.0.1 with one bucket.

    Yields an S3Server: .endpoint, .bucket, .env (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION), .url(*parts) -> "s3://bucket/...", .keys(prefix), .client() (boto3).
    It does not touch os.environ: pass .env to the processes that need it.
    """
    process, server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        stop_group(process)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL on 127.0.0.1 (run as the `postgres` user when the tests run as root).

    Yields a PostgresServer: .uri(db), .create_database(name) -> URI, .port.
    """
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` subprocess with a SQLite store; yields its http URI. Tests tell their runs apart by
    run name (each test its own) or by an experiment of their own."""
    from tests.jobs.conftest import start_mlflow_server, stop_process_group

    process, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The real demo photos as shards (train) and a folder (val)."""
    from gan_core.data import prepare_demo_folders, write_shards

    root = tmp_path_factory.mktemp("demo")
    train_dir, val_dir = prepare_demo_folders(root)
    write_shards(train_dir, root / "train_shards", crop_size=192, step=96)
    return root
