"""MLflow for a team: a real `mlflow server` on PostgreSQL with artifacts on S3 (tests/servers.py), a sweep of 4
concurrent trials logging into it with no metric point lost, sample grids and the logged model in the bucket,
and jobs.promote moving an alias."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from jobs import promote, train, tune
from tests.jobs.conftest import REPO, stop_process_group, tiny_overrides, wait_for_http
from tests.servers import free_port

pytestmark = pytest.mark.slow
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
STEPS = 6
# What every trial logs at which steps (train.log_every=1, val_every=2, pretrain_steps=2; see tiny_overrides).
EXPECTED_STEPS = {"g/pix": list(range(1, STEPS + 1)), "lr/g": list(range(1, STEPS + 1)),
                  "val/psnr_y": [2, 4, 6], "d/real": [3, 4, 5, 6]}


@pytest.fixture(scope="module")
def team_server(postgres_server, s3_server, tmp_path_factory):
    """`mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://bucket/mlartifacts`."""
    root = tmp_path_factory.mktemp("team-mlflow")
    database = postgres_server.create_database("mlflow_team")
    port = free_port()
    env = {**__import__("os").environ, **s3_server.env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", database.replace("postgresql://", "postgresql+psycopg2://"),
         "--artifacts-destination", s3_server.url("mlartifacts"), "--workers", "2"],
        env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout=180)
        yield uri
    finally:
        stop_process_group(process)


def test_concurrent_sweep_loses_no_metric_point_and_artifacts_land_in_s3(ray_local, team_server, s3_server,
                                                                          demo_data, tmp_path, capsys):
    space = tmp_path / "team.yaml"
    space.write_text(f"base: {DEMO}\nmetric: val/psnr_y\nmode: max\nnum_samples: 1\nscheduler: {{name: fifo}}\n"
                     "param_space:\n  optim.g_lr: {grid: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]}\n")
    summary = tune.main(["--space", str(space), "--workers-per-trial", "1", "--cpus-per-worker", "0.25",
                         "--trial-cpus", "0.25", "--max-concurrent", "4", "--name", "team",
                         "--tracking-uri", team_server,
                         *tiny_overrides(demo_data, tmp_path, STEPS, **{"run.storage_path": s3_server.url("sweeps")})])
    rows = summary["trials"]
    assert len(rows) == 4 and all(row["status"] == "finished" for row in rows), rows
    # The sweep's state is on S3 (Tune's experiment folder and the trials' checkpoints).
    assert any(key.startswith("sweeps/team/") for key in s3_server.keys("sweeps/"))

    client = MlflowClient(team_server)
    logged = expected = 0
    for row in rows:
        for key, steps in EXPECTED_STEPS.items():
            history = sorted(m.step for m in client.get_metric_history(row["run_id"], key))
            logged += len(history)
            expected += len(steps)
            assert history == steps, (row["trial"], key, history)
    print(f"metric points logged {logged} / expected {expected} over {len(rows)} concurrent trials")
    assert logged == expected
    # Sample grids go through the server into the bucket.
    artifact_keys = s3_server.keys("mlartifacts/")
    for row in rows:
        assert any(row["run_id"] in key and "/samples/step_" in key for key in artifact_keys), row["run_id"]


def test_logged_model_lands_in_s3_and_promote_moves_the_alias(ray_local, team_server, s3_server, demo_data,
                                                              tmp_path):
    metrics = train.main(["--config", str(DEMO), "--num-workers", "1", "--name", "team-model", "--tracking-uri",
                          team_server, *tiny_overrides(demo_data, tmp_path, 2, **{"train.pretrain_steps": "2"})])
    assert metrics["step"] == 2
    assert any(key.endswith("/MLmodel") for key in s3_server.keys("mlartifacts/")), "no logged model in S3"
    client = MlflowClient(team_server)
    (run,) = client.search_runs([client.get_experiment_by_name("gan-enhance-demo").experiment_id],
                                filter_string="tags.`gan.run_name` = 'team-model'")
    promote.main(["--registered-model", "team-sr", "--alias", "champion", "--run-id", run.info.run_id,
                  "--min-gain-db", "-100", "--data", str(demo_data / "val"), "--max-images", "1", "--crop", "64",
                  "--tracking-uri", team_server])
    assert client.get_model_version_by_alias("team-sr", "champion").run_id == run.info.run_id
