"""Session fixtures shared by every test folder: real servers from tests/servers.py."""

from __future__ import annotations

import pytest

from tests.servers import S3Server, start_postgres, start_s3_server, stop_group, stop_postgres


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
