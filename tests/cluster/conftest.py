"""A real multi-node Ray cluster on this machine: a head and a worker node, each a `ray start --block` process.

Each node runs in its own process group (start_new_session=True), with its own --temp-dir, its own ports, its own
node IP (127.0.0.1 for the head, 127.0.0.2 for the worker: all of 127/8 is loopback on Linux, so the two nodes are
told apart by IP as on a real cluster) and its own resources. Both carry one `trainer` slot, so a run that asks
`--resources-per-worker '{"trainer": 1}'` gets exactly one DDP worker per node.

`ClusterNode.kill()` is a spot node disappearing: SIGKILL to every process of that node (the `ray start` process,
its raylet, its agents and the Ray workers the raylet forked), found by walking /proc from the node's `ray start`
process and by the node's temp dir on their command lines. `ray stop` cannot do this: it stops every Ray node on
the machine (other tests' clusters included).

Checkpoints go to the S3 server of tests/conftest.py (`s3_server`): since Ray 2.7 a multi-node Train run needs
its storage_path on shared storage, and every node gets the AWS_* variables from the environment `ray start` runs
in (a Ray worker's environment is fixed when its raylet starts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.jobs.conftest import REPO, free_port

BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"

# Faster than the defaults (3 s x 5): a SIGKILLed node is declared dead in ~3 s, not ~15 s.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # A worker group that cannot be placed fails over after 15 s, not 60 s: right after a node dies, before the GCS
    # has declared it dead, an elastic run still counts it and asks for a group it cannot place.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
    # The controller registers a checkpoint when it next polls the workers (default every 2 s): a node lost in
    # between sends the run back one checkpoint more. The test runs' checkpoint intervals are seconds long.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _pids_mentioning(text: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@dataclass
class ClusterNode:
    """One `ray start --block` node of the test cluster."""

    name: str
    ip: str
    temp_dir: Path
    args: list[str]
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen | None = None
    starts: int = 0
    node_ids: list[str] = field(default_factory=list)  # one per start

    def start(self) -> None:
        self.starts += 1
        with open(self.log_dir / f"{self.name}-{self.starts}.log", "w") as log:  # the child keeps its own copy
            self.process = subprocess.Popen([str(BIN / "ray"), "start", "--block", *self.args], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> set[int]:
        """Every live process of this node."""
        if self.process is None:
            return set()
        pids = {self.process.pid} | _descendants(self.process.pid) | _pids_mentioning(str(self.temp_dir))
        pids.discard(os.getpid())
        return pids

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once (a spot node vanishing). Returns the pids killed."""
        pids = sorted(self.pids())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.process.wait(timeout=30)
        return pids

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.kill()  # stray workers of a node whose `ray start` already died
            return
        pids = self.pids()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            # A node that has not stopped in 5 s gets SIGKILL below (CI: the head took the full 30 s the wait
            # used to allow, then was killed anyway; the test cluster is thrown away).
            self.process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class RayCluster:
    """Head + worker node. `address` is the GCS address for RAY_ADDRESS / ray.init."""

    head: ClusterNode
    worker: ClusterNode
    address: str
    env: dict[str, str]  # what a driver on this machine needs (RAY_ADDRESS, token auth, AWS_* of the S3 server)

    def alive_nodes(self) -> list[dict]:
        """The GCS's alive nodes, read by a short-lived client process (this test process stays Ray-free)."""
        return json.loads(self.ask(
            "import json\nprint(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], "
            "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))", "list the cluster's nodes"))

    def ask(self, code: str, what: str) -> str:
        """Run `code` in a short-lived driver attached to the cluster (this test process stays Ray-free); return
        the last line it printed."""
        code = f"import ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}"
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cannot {what}: {done.stderr[-2000:]}")
        return done.stdout.strip().splitlines()[-1]

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            if time.time() > deadline:
                raise TimeoutError(f"expected {count} alive nodes, have {nodes}")
            time.sleep(1)

    def start_worker(self) -> str:
        """Start (or restart) the worker node and wait until it is alive; return its node id."""
        self.worker.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            # A node id of this start: the killed node may still be listed alive until the GCS notices.
            nodes = [n for n in self.alive_nodes() if n["ip"] == WORKER_IP and n["id"] not in self.worker.node_ids]
            if nodes:
                self.worker.node_ids.append(nodes[0]["id"])
                return nodes[0]["id"]
            if not self.worker.alive:
                raise RuntimeError(f"the worker node exited: see {self.worker.log_dir}")
            time.sleep(1)
        raise TimeoutError("the worker node did not join the cluster in 120 s")

    def ensure_worker(self) -> None:
        """The worker node alive and the cluster at its two nodes (a previous test may have killed the worker, and
        the GCS may still list the killed node as alive for a while: a run started then would see one node)."""
        if not self.worker.alive or not any(n["ip"] == WORKER_IP for n in self.alive_nodes()):
            self.worker.kill()
            self.start_worker()
        self.wait_for_nodes(2)
        self.wait_for_free_trainer_slots(2)
        self.refresh_train_resource_view()

    def refresh_train_resource_view(self) -> None:
        """Make Ray Train's resource view current. An elastic run sizes its first worker group from the
        reservations of the cluster's AutoscalingCoordinator actor (detached, one per cluster), which re-reads the
        node list every 20 s: right after a node restart it may still list the dead node and not the new one, and
        the run starts with 1 worker although both are free (seen in CI). A `recompute` query makes it re-read the
        nodes and drop expired requests now. No-op before the first Train run created the actor."""
        self.ask("try:\n"
                 "    actor = ray.get_actor('AutoscalingCoordinator', namespace='AutoscalingCoordinator')\n"
                 "except ValueError:\n"
                 "    actor = None\n"
                 "if actor is not None:\n"
                 "    ray.get(actor.get_reserved_resources.remote('gan-enhance-tests', recompute=True), timeout=60)\n"
                 "print('refreshed' if actor is not None else 'no coordinator yet')",
                 "refresh Ray Train's resource view")

    def free_trainer_slots(self) -> float:
        """The cluster's available `trainer` resource, as the scheduler sees it now."""
        return float(self.ask("print(ray.available_resources().get('trainer', 0.0))", "read the cluster's resources"))

    def wait_for_free_trainer_slots(self, count: int, timeout: float = 120.0) -> None:
        """Until both trainer slots are free: a node that just joined, or the actors of a run that just ended, can
        leave the scheduler's view a slot short for a few seconds, and an elastic run would then start smaller."""
        deadline = time.time() + timeout
        while (free := self.free_trainer_slots()) < count:
            if time.time() > deadline:
                raise TimeoutError(f"expected {count} free trainer slots, have {free}")
            time.sleep(1)


_HANDED_OUT: set[int] = set()


def _distinct_free_ports(count: int) -> list[int]:
    """`count` free ports never handed out before in this session. Each free_port() closes its socket, so two
    calls can return the same port (seen: the dashboard agent's HTTP and gRPC ports equal, `ray start` refused)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


def _node_ports() -> list[str]:
    flags = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    return [item for flag, port in zip(flags, _distinct_free_ports(len(flags))) for item in (flag, str(port))]


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    """Head (4 CPUs, trainer slot) + worker node (2 CPUs, trainer slot), token auth, S3 credentials on every node."""
    log_dir = tmp_path_factory.mktemp("ray-cluster-logs")
    # Short temp dirs: Ray's Unix socket paths live under them (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="gc-", dir="/tmp"))
    env = {**os.environ, **s3_server.env, **FAST_FAILURE_DETECTION, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    port, client_port = _distinct_free_ports(2)
    head = ClusterNode(
        "head", HEAD_IP, root / "head",
        ["--head", "--port", str(port), "--node-ip-address", HEAD_IP, "--temp-dir", str(root / "head"),
         "--num-cpus", "4", "--resources", json.dumps({"trainer": 1}), "--include-dashboard", "false",
         "--ray-client-server-port", str(client_port), "--min-worker-port", "0", "--max-worker-port", "0",
         "--disable-usage-stats", *_node_ports()],
        env, log_dir)
    address = f"{HEAD_IP}:{port}"
    worker = ClusterNode(
        "worker", WORKER_IP, root / "worker",
        ["--address", address, "--node-ip-address", WORKER_IP, "--temp-dir", str(root / "worker"),
         "--num-cpus", "2", "--resources", json.dumps({"trainer": 1}), "--min-worker-port", "0",
         "--max-worker-port", "0", "--disable-usage-stats", *_node_ports()],
        env, log_dir)
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.is_file() else None
    cluster = RayCluster(head=head, worker=worker, address=address, env={**env, "RAY_ADDRESS": address})
    try:
        head.start()
        cluster.wait_for_nodes(1)
        cluster.start_worker()
        yield cluster
    finally:
        worker.stop()
        head.stop()
        # `ray start --head` records its address in /tmp/ray/ray_current_cluster; leave it as it was.
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
        shutil.rmtree(root, ignore_errors=True)
