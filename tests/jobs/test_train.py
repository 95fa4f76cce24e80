"""jobs.train on a real local Ray cluster with 2 workers, tracked by a real mlflow server."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs import train
from jobs.tracking.runs import RUN_NAME_TAG
from tests.jobs.conftest import REPO, tiny_overrides

DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
pytestmark = pytest.mark.slow


def _run(name, mlflow_server, demo_data, storage, steps, *flags, **extra):
    return train.main(["--config", DEMO, "--num-workers", "2", "--name", name, "--tracking-uri", mlflow_server,
                       *flags, *tiny_overrides(demo_data, storage, steps, **extra)])


def _runs_named(client, name):
    experiment = client.get_experiment_by_name("gan-enhance-demo")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


# Same LRs for 4 or 8 steps: a run stopped at 4 and resumed to 8 must match an uninterrupted 8-step run.
CONSTANT_LR = {"schedule.lr_schedule": "constant", "schedule.warmup_steps": "0"}


@pytest.fixture(scope="module")
def basic_run(ray_local, mlflow_server, demo_data, tmp_path_factory):
    """An uninterrupted, registered 8-step run: checked in full by the first test, and the reference that the
    resume test compares its resumed steps with (one Train run less: each costs ~30 s on 2 cores)."""
    return _run("basic", mlflow_server, demo_data, tmp_path_factory.mktemp("basic"), 8, "--register", "basic-sr",
                **CONSTANT_LR)


def test_two_workers_train_and_track_everything(basic_run, mlflow_server):
    metrics = basic_run
    assert metrics["step"] == 8 and metrics["registered_version"] == "1"
    client = MlflowClient(mlflow_server)
    (run,) = _runs_named(client, "basic")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["generator.num_feat"] == "8" and run.data.params["num_workers"] == "2"
    assert {"git_commit", "checkpoint_location", "model_uri"} <= set(run.data.tags)
    assert "ray_job_id" not in run.data.tags and all(value != "" for value in run.data.tags.values())
    assert [m.step for m in client.get_metric_history(run_id, "g/pix")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [m.step for m in client.get_metric_history(run_id, "val/psnr_y")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(run_id, "d/real")] == [3, 4, 5, 6, 7, 8]  # GAN phase only
    assert client.get_metric_history(run_id, "perf/img_per_s")[-1].value > 0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == [f"samples/step_{step:07d}.png" for step in (2, 4, 6, 8)]
    checkpoint = Path(run.data.tags["checkpoint_location"])
    assert (checkpoint / "checkpoint.pt").is_file()
    assert (checkpoint / "sampler_rank0.pt").is_file() and (checkpoint / "sampler_rank1.pt").is_file()
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    out = model.unwrap_python_model().enhance(np.zeros((12, 10, 3), np.uint8))
    assert out.shape == (48, 40, 3) and out.dtype == np.uint8
    # The registry record: the model is named after the run, carries its validation metrics and the files
    # other tools load, and the version's description is a model card.
    logged = mlflow.get_logged_model(run.data.tags["model_uri"].split("/")[-1])
    assert logged.name == "basic"
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["val/psnr_y"] == pytest.approx(run.data.metrics["val/psnr_y"])
    assert "val/bicubic_psnr_y" in linked
    version = client.get_model_version("basic-sr", "1")
    assert "bicubic" in version.description and "gan_core only" in version.description  # res_scale/grow != BasicSR
    assert version.tags["run_name"] == "basic"
    flavor_artifacts = set(model.metadata.flavors["python_function"]["artifacts"])
    assert {"generator", "safetensors"} <= flavor_artifacts


def test_rerun_same_name_resumes_step_and_mlflow_run(basic_run, ray_local, mlflow_server, demo_data, tmp_path):
    _run("resume", mlflow_server, demo_data, tmp_path, steps=4, **CONSTANT_LR)
    metrics = _run("resume", mlflow_server, demo_data, tmp_path, steps=8, **CONSTANT_LR)
    assert metrics["step"] == 8
    client = MlflowClient(mlflow_server)
    runs = _runs_named(client, "resume")
    assert len(runs) == 1, "a rerun must log into the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "g/pix")]
    assert steps == list(range(1, 9)), "the step counter continues; nothing is trained twice"
    assert runs[0].data.tags["resume.override.train.total_steps"] == "4 -> 8"

    # Resuming is exact: G, D, optimizers, EMA, sampler and each worker's rows come back, so steps 5-8
    # (GAN steps, D included) lose exactly what an uninterrupted 8-step run of the same config loses.
    (straight,) = _runs_named(client, "basic")
    for key in ("g/pix", "g/adv", "d/total"):
        resumed = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
        uninterrupted = {m.step: m.value for m in client.get_metric_history(straight.info.run_id, key)}
        assert [resumed[step] for step in range(5, 9)] == [uninterrupted[step] for step in range(5, 9)], key


def _train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if "RayTrainWorker" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_killed_worker_restarts_from_checkpoint_and_finishes(ray_local, mlflow_server, demo_data, tmp_path):
    killed: list[int] = []

    def kill_one_worker_after_first_checkpoint():
        deadline = time.time() + 1200
        while time.time() < deadline and not killed:
            if list(tmp_path.glob("fault/checkpoint_*/checkpoint.pt")):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    watcher.start()
    metrics = _run("fault", mlflow_server, demo_data, tmp_path, steps=40,
                   **{"train.ckpt_every": "4", "train.val_every": "4", "train.log_every": "4"})
    watcher.join(timeout=5)
    assert killed, "the test never found a training worker to kill"
    assert metrics["step"] == 40
    client = MlflowClient(mlflow_server)
    (run,) = _runs_named(client, "fault")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr_y")]
    assert steps[-1] == 40 and steps[0] == 4
    # The restarted workers replay the steps since the checkpoint; each (key, step) is logged once.
    for key in ("val/psnr_y", "g/pix"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(4, 41, 4)), key


def test_unreachable_tracking_server_fails_at_once(demo_data, tmp_path, capsys):
    from tests.jobs.conftest import free_port

    start = time.time()
    with pytest.raises(SystemExit) as exit_info:
        from jobs.cli import run_main

        run_main(lambda: train.main(["--config", DEMO, "--tracking-uri", f"http://127.0.0.1:{free_port()}",
                                     *tiny_overrides(demo_data, tmp_path, 2)]))
    assert exit_info.value.code == 2
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:" in err and "unreachable" in err


def test_source_sampling_needs_shards_with_a_source_column(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gan_core.config import load_config
    from gan_core.data.images import encode_png
    from jobs.cli import JobError
    from jobs.training.trainer import build_trainer

    shards = tmp_path / "plain_shards"
    shards.mkdir()
    pq.write_table(pa.table({"image": [encode_png(np.zeros((64, 64, 3), np.uint8))]}), shards / "part-00000.parquet")
    (tmp_path / "val").mkdir()
    cfg = load_config(DEMO, [f"data.train={shards}", f"data.val={tmp_path / 'val'}", "data.sampling=source",
                             "run.name=no-source"])
    with pytest.raises(JobError, match="data.sampling=source needs a `source` column"):
        build_trainer(cfg, num_workers=2, use_gpu=False, loop_config={})
    tile = cfg.with_values({"data.sampling": "tile"})
    assert build_trainer(tile, num_workers=2, use_gpu=False, loop_config={}) is not None
