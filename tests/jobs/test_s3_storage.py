"""Checkpoints on a real S3-compatible server (moto_server, tests/servers.py): training and resume by name,
`--model s3://...` for evaluate / promote / export, `train.init_from=s3://...`, a PBT sweep on S3; the endpoint
and keys (standard AWS variables) never reach logs, MLflow params or tags."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from jobs import evaluate, export, promote, train
from jobs.tracking.runs import RUN_NAME_TAG
from tests.jobs.conftest import REPO, tiny_overrides

DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


def _runs_named(client, name, experiment="gan-enhance-demo"):
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def _assert_no_secrets(s3_server, *texts: str) -> None:
    secrets = (s3_server.env["AWS_SECRET_ACCESS_KEY"], s3_server.env["AWS_ACCESS_KEY_ID"], s3_server.endpoint,
               s3_server.endpoint.removeprefix("http://"))
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked"


def _run_text(client, run) -> str:
    full = client.get_run(run.info.run_id)
    return json.dumps({"params": full.data.params, "tags": full.data.tags})


@pytest.fixture(scope="module")
def s3_run(ray_local, mlflow_server, demo_data, s3_server, tmp_path_factory):
    """A 4-step run on S3, then the same --name to 6 steps: resumed from the bucket."""
    storage = s3_server.url("train")
    scratch = tmp_path_factory.mktemp("s3run")
    argv = ["--config", DEMO, "--num-workers", "2", "--name", "on-s3", "--tracking-uri", mlflow_server]
    constant = {"schedule.lr_schedule": "constant", "schedule.warmup_steps": "0"}
    train.main([*argv, *tiny_overrides(demo_data, scratch, 4, **{"run.storage_path": storage, **constant})])
    metrics = train.main([*argv, *tiny_overrides(demo_data, scratch, 6, **{"run.storage_path": storage, **constant})])
    return metrics, storage


def test_training_checkpoints_to_s3_and_resumes_by_name(s3_run, s3_server, mlflow_server, capfd):
    metrics, storage = s3_run
    assert metrics["step"] == 6
    keys = s3_server.keys("train/on-s3/")
    assert any(key.endswith("/checkpoint.pt") for key in keys), keys
    assert any(key.endswith("/manifest.json") for key in keys)
    client = MlflowClient(mlflow_server)
    (run,) = _runs_named(client, "on-s3")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g/pix")] == list(range(1, 7))
    location = run.data.tags["checkpoint_location"]
    assert location.startswith(f"{storage}/on-s3/") and "checkpoint_" in location  # a URI, not bucket/key
    out = capfd.readouterr()
    _assert_no_secrets(s3_server, _run_text(client, run), out.out, out.err)


def test_evaluate_export_promote_read_an_s3_checkpoint(s3_run, s3_server, mlflow_server, demo_data, tmp_path,
                                                       capfd):
    _, storage = s3_run
    client = MlflowClient(mlflow_server)
    (run,) = _runs_named(client, "on-s3")
    checkpoint = run.data.tags["checkpoint_location"]
    common = ["--data", str(demo_data / "val"), "--max-images", "1", "--crop", "64"]
    # The run folder (its newest complete checkpoint) and the checkpoint folder itself give the same model.
    by_folder = evaluate.main(["--model", f"{storage}/on-s3", *common, "--no-log"])
    by_checkpoint = evaluate.main(["--model", checkpoint, *common, "--no-log"])
    assert by_folder["metrics"] == by_checkpoint["metrics"] and by_folder["metrics"]["psnr_y"] > 0
    exported = export.main(["--model", checkpoint, *common, "--output", str(tmp_path / "export"), "--no-int8"])
    assert (tmp_path / "export" / "generator.onnx").is_file(), exported
    # promote --run-id of a run whose model is not in MLflow: it reads the generator from the run's s3://
    # checkpoint_location tag, registers it and moves the alias.
    client.delete_tag(run.info.run_id, "model_uri")
    decision = promote.main(["--registered-model", "s3-model", "--alias", "candidate", "--run-id", run.info.run_id,
                             "--min-gain-db", "-100", "--tracking-uri", mlflow_server, *common])
    assert client.get_model_version_by_alias("s3-model", "candidate").run_id == run.info.run_id, decision
    out = capfd.readouterr()
    _assert_no_secrets(s3_server, out.out, out.err)


def test_missing_s3_model_says_so(s3_server, monkeypatch):
    from jobs.cli import JobError
    from jobs.tracking.model_source import resolve_model

    for key, value in s3_server.env.items():  # also when run alone, before ray_local has exported them
        monkeypatch.setenv(key, value)

    with pytest.raises(JobError, match="nothing there"):
        resolve_model(s3_server.url("no", "such", "run"), "/tmp/unused")


def test_init_from_an_s3_checkpoint(s3_run, s3_server, mlflow_server, demo_data, tmp_path):
    _, storage = s3_run
    # S3 storage: the driver checks the source can be read, each worker downloads it (local storage: the driver
    # downloads once into the run folder; same resolve_model code).
    metrics = train.main(["--config", DEMO, "--num-workers", "2", "--name", "init-s3", "--tracking-uri",
                          mlflow_server, *tiny_overrides(demo_data, tmp_path, 2, **{
                              "run.storage_path": s3_server.url("init"), "train.init_from": f"{storage}/on-s3",
                              "train.pretrain_steps": "2", "optim.g_lr": "1e-12"})])
    assert metrics["step"] == 2
    # With a learning rate of 1e-12 the trained model is the donor: its validation equals the donor's last one.
    client = MlflowClient(mlflow_server)
    (donor,) = _runs_named(client, "on-s3")
    (run,) = _runs_named(client, "init-s3")
    assert run.data.metrics["val/psnr_y"] == pytest.approx(donor.data.metrics["val/psnr_y"], abs=1e-3)
