"""Real servers shared by the test folders: an S3-compatible server (moto) and PostgreSQL, both on 127.0.0.1.

moto's server (PyPI `moto[server]`) is used for S3 rather than MinIO: it installs from the package registry
with pip like every other test dependency (MinIO is a separate binary download), starts in about a second,
and speaks the S3 API that pyarrow's S3 file system, boto3 and MLflow's artifact store use.

PostgreSQL is Debian's `postgresql` package. It refuses to run as root, and CI runs as root, so the fixture
runs `initdb` / `pg_ctl` as the `postgres` system user on a data folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers; the status is not the point
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children (SIGTERM, then SIGKILL)."""
    from tests.jobs.conftest import stop_process_group

    stop_process_group(process)


@dataclass
class S3Server:
    """A running S3-compatible server.

    endpoint: http://127.0.0.1:PORT; bucket: a bucket that exists; env: the standard AWS variables that point
    any client (pyarrow, boto3, MLflow, Ray workers) at this server. The keys are fake, but distinctive, so
    tests can assert they never show up in logs, params or tags.
    """

    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        """s3://bucket/part/part..."""
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under prefix in the bucket."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", [])]


def start_s3_server(log_dir: Path, bucket: str = "gan-test") -> tuple[subprocess.Popen, S3Server]:
    """Start `moto_server` on a free 127.0.0.1 port in its own process group and create `bucket`."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if moto is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (it is in the test extra)")
    process = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log_dir / "moto.log", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(f"{endpoint}/moto-api/")
    server = S3Server(endpoint=endpoint, bucket=bucket, env={
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIATESTKEYGANENHANCE",
        "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-log-8f3a",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    server.client().create_bucket(Bucket=bucket)
    return process, server


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (.ci/run does)")
    return found


@dataclass
class PostgresServer:
    """A running PostgreSQL: uri is postgresql://postgres@127.0.0.1:PORT/DB (trust auth on 127.0.0.1)."""

    port: int
    data_dir: Path

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; return its URI."""
        import psycopg2

        connection = psycopg2.connect(self.uri())
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.uri(name)


def _as_postgres_user(args: list[str]) -> list[str]:
    # PostgreSQL will not run as root; as any other user it runs as that user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def start_postgres() -> PostgresServer:
    """initdb a fresh cluster in a folder the server's user owns, start it on a free port, wait until ready."""
    # Not under pytest's tmp_path: that is mode 0700 for root, unreachable for the postgres user.
    data_dir = Path(tempfile.mkdtemp(prefix="gan-pg-")) / "data"
    data_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data_dir.parent, "postgres")
        shutil.chown(data_dir, "postgres")
        data_dir.parent.chmod(0o755)
    subprocess.run(_as_postgres_user([_postgres_bin("initdb"), "-D", str(data_dir), "-U", "postgres",
                                      "--auth=trust", "-E", "UTF8"]),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    port = free_port()
    # unix_socket_directories: the data folder, not /var/run/postgresql (may not exist or be writable).
    subprocess.run(_as_postgres_user([_postgres_bin("pg_ctl"), "-D", str(data_dir), "-l", str(data_dir / "log"),
                                      "-o", f"-p {port} -h 127.0.0.1 -k {data_dir} -c max_connections=200",
                                      "-w", "-t", "60", "start"]),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return PostgresServer(port=port, data_dir=data_dir)


def stop_postgres(server: PostgresServer) -> None:
    subprocess.run(_as_postgres_user([_postgres_bin("pg_ctl"), "-D", str(server.data_dir), "-m", "fast", "-w",
                                      "stop"]), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)
