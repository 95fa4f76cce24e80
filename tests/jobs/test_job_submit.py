"""The real `ray job submit` CLI against `ray start --head` on local ports, running the demo recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking import RUN_NAME_TAG
from tests.jobs.conftest import REPO, free_port, stop_process_group, tiny_overrides, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` from this environment (submitted jobs use the `python` on its PATH), in its own
    process group, stopped by signalling that group: `ray stop` would stop every Ray cluster on the machine,
    including the one this test process is attached to."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard_port, client_port = free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--ray-client-server-port", str(client_port), "--num-cpus", "4", "--include-dashboard", "true",
         "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "ray_head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_http(f"{address}/api/version", timeout=180, any_status=True)
        yield address, env
    finally:
        stop_process_group(head)


def test_ray_job_submit_runs_demo_recipe(ray_head, mlflow_server, demo_data, tmp_path):
    address, env = ray_head
    env = {**env, "RAY_AUTH_MODE": "token"}
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "-m", "jobs.train", "--config", "jobs/configs/demo.yaml", "--num-workers", "2",
        "--name", "submitted", "--tracking-uri", mlflow_server,
        *tiny_overrides(demo_data, tmp_path / "results", steps=4),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "PSNR  model" in log, log[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("gan-enhance-demo")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'submitted'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_job_id"].startswith("raysubmit_")
    assert (tmp_path / "results" / "submitted").is_dir()
