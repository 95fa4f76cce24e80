"""The real `ray job submit` CLI against `ray start --head` on local ports, running the demo recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking.runs import RUN_NAME_TAG
from tests.jobs.conftest import REPO, free_port, stop_process_group, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` from this environment (submitted jobs use the `python` on its PATH), in its own
    process group, stopped by signalling that group: `ray stop` would stop every Ray cluster on the machine,
    including the one this test process is attached to. One head for the module: its tests submit to it in turn
    (a start and a stop of a head cost ~40 s on 2 cores)."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # where submitted jobs keep relative outputs (jobs.cli.job_home); ~/gan-enhance when unset
           "GAN_ENHANCE_HOME": str(tmp_path / "gan-enhance-home")}
    env.pop("RAY_ADDRESS", None)
    # Like a user's fresh shell: no tracking URI that an earlier test's mlflow.set_tracking_uri left in os.environ
    # (submitted jobs inherit the head's environment).
    env.pop("MLFLOW_TRACKING_URI", None)
    # Every port on a free one: another Ray cluster on this machine (the tests' own) holds the defaults, and a
    # dashboard agent that cannot bind its port leaves the head answering "No available agent to submit job".
    port, dashboard_port, client_port = free_port(), free_port(), free_port()
    agent_ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                   "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.is_file() else None
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--ray-client-server-port", str(client_port), "--num-cpus", "4", "--include-dashboard", "true",
         "--disable-usage-stats", *agent_ports],
        env=env, stdout=open(tmp_path / "ray_head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_until_jobs_api_answers(bin_dir, address, {**env, "RAY_AUTH_MODE": "token"})
        yield address, env
    finally:
        # `ray start --block` takes longer than 20 s to stop on SIGTERM here (CI: the full 20 s every time, then
        # SIGKILL); its cluster is thrown away, so the group gets SIGKILL after 5 s.
        stop_process_group(head, timeout=5)
        _restore(address_file, before)


def _restore(path: Path, text: str | None) -> None:
    # `ray start` records its address in /tmp/ray/ray_current_cluster and only `ray stop` removes it. Left
    # pointing at this stopped head, it would send later state-API calls (Train's placement-group cleaner)
    # to a dead cluster.
    if text is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(text)


def _wait_until_jobs_api_answers(bin_dir: str, address: str, env: dict, timeout: float = 180.0) -> None:
    # The dashboard answers HTTP before its job API is ready; ask the job API itself, as the CLI does.
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([f"{bin_dir}/ray", "job", "list", "--address", address], env=env,
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray job API at {address} did not answer in {timeout} s: {done.stderr[-500:]}")


def test_ray_job_submit_runs_demo_recipe(ray_head, mlflow_server, demo_data, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_AUTH_MODE": "token"}
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "-m", "jobs.train", "--config", "jobs/configs/demo.yaml", "--num-workers", "2",
        "--name", "submitted", "--tracking-uri", mlflow_server,
        *tiny_overrides(demo_data, tmp_path / "results", steps=4),
    ]
    for _ in range(20):  # right after start the head can answer "No available agent to submit job, try again"
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        log = done.stdout + done.stderr
        if "No available agent" not in log:
            break
        time.sleep(3)
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "PSNR  model" in log, log[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("gan-enhance-demo")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'submitted'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_job_id"].startswith("raysubmit_")
    assert (tmp_path / "results" / "submitted").is_dir()


def _documented_command(path: Path) -> str:
    """The `ray job submit` line of a recipe header, exactly as written there."""
    (line,) = [line for line in path.read_text().splitlines() if "ray job submit" in line and line.startswith("#   ")]
    return line.removeprefix("#   ")


def _checkout_without_ignored(tmp_path: Path, demo_data: Path) -> Path:
    """The repository's files as a user's checkout has them (no venv, no outputs), with the demo data where
    `python -m jobs.prepare_data --demo` writes it: data/demo (which .gitignore ignores)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "mlruns", "mlartifacts", "ray_results", "mlflow.db", "__pycache__", "*.egg-info",
        ".pytest_cache", "outputs", "build"))
    (checkout / "data").mkdir()
    (checkout / "data" / "demo").symlink_to(demo_data, target_is_directory=True)
    return checkout


def _submit(command: str, address: str, env: dict, cwd: Path) -> tuple[int, str]:
    command = command.replace("http://127.0.0.1:8265", address)
    for _ in range(20):  # right after start the head can answer "No available agent to submit job, try again"
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
        log = done.stdout + done.stderr
        if "No available agent" not in log:
            break
        time.sleep(3)
    return done.returncode, log


def test_documented_demo_command_works_as_pasted(ray_head, demo_data, tmp_path):
    """demo.yaml's header command, pasted into a shell in a checkout against a local head: only the address is
    changed, and train.* overrides that shrink the 750-step recipe to a few steps are appended."""
    address, env = ray_head
    env = {key: value for key, value in env.items() if key not in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
    home = Path(env["GAN_ENHANCE_HOME"])
    checkout = _checkout_without_ignored(tmp_path, demo_data)
    documented = _documented_command(REPO / "jobs" / "configs" / "demo.yaml")
    # The head requires Ray's token (the default since Ray 2.60); the pasted line itself says so.
    assert documented.startswith("RAY_AUTH_MODE=token ray job submit")
    assert "data.train=$PWD/data/demo/train_shards" in documented
    shrink = (" run.name=pasted train.total_steps=4 train.pretrain_steps=2 train.val_every=2 train.ckpt_every=2 "
              "data.max_val_images=1 data.val_crop=64 generator.num_block=1 generator.num_feat=8 "
              "generator.num_grow_ch=8 discriminator.num_feat=8 data.batch_size=2 data.patch_size=32")

    # Without the data paths (the old header): the job says why data/ is missing and what to pass, and leaves
    # no MLflow run behind.
    old = documented.split(" data.train=")[0]
    code, log = _submit(old + shrink, address, env, checkout)
    assert code != 0, log[-3000:]
    assert "does not exist inside this Ray job" in log and ".gitignore" in log, log[-3000:]
    assert "data.train=$PWD/data/demo/train_shards" in log, log[-3000:]
    store = home / "mlflow.db"
    if store.exists():
        client = MlflowClient(f"sqlite:///{store}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), "an empty run was left"

    # As documented: it succeeds; the MLflow store and checkpoints are in the stable folder, not Ray's copy.
    code, log = _submit(documented + shrink, address, env, checkout)
    assert code == 0 and "succeeded" in log, log[-4000:]
    assert f"using {home / 'ray_results'}" in log and f"using {store}" in log, log[-4000:]
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("gan-enhance-demo")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'pasted'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint_location"].startswith(str(home / "ray_results" / "pasted"))
    assert any((home / "ray_results" / "pasted").rglob("checkpoint.pt"))
    assert "_ray_pkg_" not in run.info.artifact_uri and "_ray_pkg_" not in run.data.params["run.storage_path"]
