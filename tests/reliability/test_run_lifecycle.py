"""jobs.train's MLflow run is closed however the job ends, and its metric history survives a tracking outage.

Real components only: `python -m jobs.train` subprocesses (signalled like a scheduler or Ctrl-C would) joined
to one local Ray cluster, real `mlflow server`s with SQLite stores, one of them stopped mid-run and started
again on the same port and file. Every scenario checks that no run is left RUNNING, the exit status, and that
each (metric key, step) is in the history once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import train
from jobs.tracking.runs import RUN_NAME_TAG
from tests.jobs.conftest import REPO, stop_process_group, tiny_overrides, wait_for_http

pytestmark = pytest.mark.slow

DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
EXPERIMENT = "gan-enhance-demo"  # demo.yaml's


# demo_data and mlflow_server: the session's (tests/conftest.py).


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module (4 logical CPUs), or the one this session already runs
    (tests/jobs' ray_local): ray.init twice in one process fails. Yields its address for subprocesses."""
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def start_mlflow_server_at(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with the SQLite store and artifacts under `root` (as
    tests/jobs/conftest.start_mlflow_server, but on a given port, so that it can be started again after a stop
    on the same address and file)."""
    with open(root / "server.log", "a") as log:  # the server keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    wait_for_http(f"http://127.0.0.1:{port}/health")
    return process


def train_command(name: str, uri: str, demo_data: Path, storage: Path, steps: int, **extra: str) -> list[str]:
    return ["--config", DEMO, "--num-workers", "2", "--name", name, "--tracking-uri", uri,
            *tiny_overrides(demo_data, storage, steps, **extra)]


def start_job(args: list[str], ray_address: str | None, out: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`python -m jobs.train args` in its own process group, joined to `ray_address`; stdout and stderr to files."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    stdout, stderr = out.with_suffix(".out"), out.with_suffix(".err")
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        process = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=env,
                                   stdout=out_file, stderr=err_file, start_new_session=True)
    return process, stdout, stderr


def wait_for_line(process: subprocess.Popen, path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text(errors="ignore"):
            return
        if process.poll() is not None:
            raise AssertionError(f"the job ended (rc {process.returncode}) before printing {text!r}:\n"
                                 f"{path.read_text()[-3000:]}\n{path.with_suffix('.err').read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {timeout} s")


def read_until(capfd, *texts: str, timeout: float = 120) -> tuple[str, str]:
    """What capfd captured (stdout, stderr), read until every text appeared: Ray streams the workers' lines
    to this driver a little after they were printed."""
    out = err = ""
    deadline = time.time() + timeout
    while True:
        captured = capfd.readouterr()
        out, err = out + captured.out, err + captured.err
        if all(text in out + err for text in texts) or time.time() > deadline:
            return out, err
        time.sleep(0.5)


def driver_tracebacks(text: str) -> list[str]:
    """Tracebacks the job itself printed. Lines Ray streams from its actors start with `(ActorName pid=...)`
    (on a machine with several Ray clusters, Train's PlacementGroupCleaner prints one of its own)."""
    return [line for line in text.splitlines() if line.startswith("Traceback")]


def runs_named(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_each_step_once(client: MlflowClient, run_id: str, keys=("g/pix", "g/total", "val/psnr_y")) -> None:
    for key in keys:
        steps = steps_of(client, run_id, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at steps {sorted({s for s in steps if steps.count(s) > 1})}"


# -- (a) the command is wrong: no run ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["data.train", "data.val"])
def test_missing_data_exits_2_with_one_line_and_leaves_no_mlflow_run(key, mlflow_server, demo_data, tmp_path):
    experiment = f"lifecycle-missing-{key.replace('.', '-')}"
    args = train_command("missing", mlflow_server, demo_data, tmp_path, 4,
                         **{key: str(tmp_path / "nowhere"), "run.experiment": experiment})
    process, stdout, stderr = start_job(args, None, tmp_path / "job")
    assert process.wait(timeout=120) == 2
    err = stderr.read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}={tmp_path / 'nowhere'} does not exist"), err
    assert not driver_tracebacks(stdout.read_text())
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None, "no experiment, so no run"


# -- (b) SIGTERM / SIGINT mid-run: KILLED, 143 / 130; (d) the rerun resumes and logs each (key, step) once ----


# The rerun is the same after either signal: it runs once, after SIGTERM (a scheduler's stop), to keep this short.
@pytest.mark.parametrize("sig, exit_code, rerun", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_marks_run_killed_and_rerun_resumes_without_duplicate_points(
        sig, exit_code, rerun, ray_cluster, mlflow_server, demo_data, tmp_path, capfd):
    name = f"signal-{sig.name.lower()}"
    # Checkpoints every 10 steps, a metric point every step: the signal comes after step 12 was logged, so the
    # rerun (from step 10) replays steps already in the history.
    cadence = {"train.ckpt_every": "10", "train.val_every": "10"}
    process, stdout, stderr = start_job(train_command(name, mlflow_server, demo_data, tmp_path, 400, **cadence),
                                        ray_cluster, tmp_path / "job")
    try:
        wait_for_line(process, stdout, "step 12/400")
        os.kill(process.pid, sig)
        assert process.wait(timeout=90) == exit_code
    finally:
        if process.poll() is None:
            stop_process_group(process, signal.SIGKILL)
    assert f"stopped by {sig.name}; rerun the same command" in stderr.read_text()
    assert not driver_tracebacks(stderr.read_text())
    client = MlflowClient(mlflow_server)
    (run,) = runs_named(client, name)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure.signal"] == sig.name
    logged_before = max(steps_of(client, run.info.run_id, "g/pix"))
    assert logged_before >= 12
    if not rerun:
        return

    # The rerun with the same --name resumes (which step it restores is checked by tests/jobs/test_train.py's
    # resume test; here Ray's workers may still be writing a checkpoint of the killed run when it starts).
    capfd.readouterr()
    metrics = train.main(train_command(name, mlflow_server, demo_data, tmp_path, 24, **cadence))
    out, _ = read_until(capfd, "resuming run", timeout=5)
    assert f"resuming run {name!r}" in out
    assert metrics["step"] == 24
    (run,) = runs_named(client, name)
    assert run.info.status == "FINISHED"
    assert "failure" not in run.data.tags and "failure.signal" not in run.data.tags
    assert_each_step_once(client, run.info.run_id)
    # Every step once, in order: 1..24 from the two attempts (the killed one may have got past 24 before the
    # signal took effect; those points stay, the rerun only adds the steps it did not hold).
    assert steps_of(client, run.info.run_id, "g/pix") == list(range(1, max(24, logged_before) + 1))
    assert steps_of(client, run.info.run_id, "val/psnr_y") == [10, 20, 24]


# -- (c) the tracking server goes away mid-run and comes back ------------------------------------------------


def test_metric_points_survive_a_tracking_outage(ray_cluster, demo_data, tmp_path, capfd):
    from tests.jobs.conftest import free_port

    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = [start_mlflow_server_at(root, port)]
    timeline = {}

    def outage():
        """Stop the server once the first checkpoint is written (step 10), start it again at the second (20)."""
        deadline = time.time() + 600
        while time.time() < deadline and len(list(tmp_path.glob("outage/checkpoint_*/checkpoint.pt"))) < 1:
            time.sleep(0.05)
        stop_process_group(server[0], signal.SIGKILL)
        timeline["down"] = time.time()
        while time.time() < deadline and len(list(tmp_path.glob("outage/checkpoint_*/checkpoint.pt"))) < 2:
            time.sleep(0.05)
        server[0] = start_mlflow_server_at(root, port)
        timeline["up"] = time.time()

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    total, log_every = 80, 2
    try:
        metrics = train.main(train_command("outage", uri, demo_data, tmp_path, total,
                                           **{"train.log_every": str(log_every), "train.ckpt_every": "10",
                                              "train.val_every": "10"}))
        watcher.join(timeout=120)
        assert "up" in timeline, "the server was never started again"
        client = MlflowClient(uri)
        (run,) = runs_named(client, "outage")
        logged = steps_of(client, run.info.run_id, "g/pix")
        assert_each_step_once(client, run.info.run_id)
    finally:
        stop_process_group(server[0], signal.SIGKILL)
    _, err = read_until(capfd, "answers again")
    print(f"FIGURES outage: g/pix expected {total // log_every}, logged {len(logged)}, distinct {len(set(logged))}; "
          f"server down {timeline['up'] - timeline['down']:.0f} s")
    assert "the points are kept and re-sent when it answers" in err and "answers again" in err
    assert "metric point(s) could not be logged" not in err
    assert metrics["step"] == total
    assert run.info.status == "FINISHED" and "model_uri" in run.data.tags
    assert logged == list(range(log_every, total + 1, log_every))


def test_server_gone_at_the_end_fails_clearly_and_a_rerun_logs_the_model_without_training(
        ray_cluster, demo_data, tmp_path, capfd):
    from jobs.training.report import FinalModelNotLogged
    from tests.jobs.conftest import free_port

    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server_at(root, port)

    def stop_server_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not list(tmp_path.glob("gone/checkpoint_*/checkpoint.pt")):
            time.sleep(0.05)
        stop_process_group(server, signal.SIGKILL)

    watcher = threading.Thread(target=stop_server_after_first_checkpoint, daemon=True)
    watcher.start()
    args = train_command("gone", uri, demo_data, tmp_path, 16,
                         **{"train.ckpt_every": "4", "train.val_every": "4", "train.log_every": "2"})
    with pytest.raises(FinalModelNotLogged, match="rerun the same command"):
        train.main(["--tracking-wait-s", "4", *args])
    _, err = read_until(capfd, "the points are kept", "could not be logged to MLflow")
    assert "the points are kept and re-sent when it answers" in err
    assert "metric point(s) could not be logged to MLflow" in err
    assert "could not mark MLflow run" in err and "FAILED" in err

    server = start_mlflow_server_at(root, port)
    try:
        client = MlflowClient(uri)
        (run,) = runs_named(client, "gone")
        assert run.info.status == "RUNNING"  # the server was down when the job ended: said above, fixed below
        before = set((tmp_path / "gone").glob("checkpoint_*"))
        metrics = train.main(args)
        written = set((tmp_path / "gone").glob("checkpoint_*")) - before
        (run,) = runs_named(client, "gone")
        assert_each_step_once(client, run.info.run_id)
    finally:
        stop_process_group(server, signal.SIGKILL)
    assert not written, "the rerun trains nothing: it restores step 16 and only logs the model"
    assert metrics["step"] == 16 and metrics["model_uri"] == run.data.tags["model_uri"]
    assert run.info.status == "FINISHED" and "final_model_pending" not in run.data.tags


# -- (e) a non-finite loss: one line, FAILED, exit 1, no restart -----------------------------------------------


def test_non_finite_loss_fails_once_without_restart(ray_cluster, mlflow_server, demo_data, tmp_path):
    # g_lr 1e30: the first Adam step sends G's weights to ~1e29, step 3's losses are nan (checked here).
    args = train_command("nan", mlflow_server, demo_data, tmp_path, 20, **{"optim.g_lr": "1e30"})
    process, stdout, stderr = start_job(args, ray_cluster, tmp_path / "job")
    try:
        assert process.wait(timeout=300) == 1
    finally:
        if process.poll() is None:
            stop_process_group(process, signal.SIGKILL)
    out, err = stdout.read_text(), stderr.read_text()
    errors = [line for line in err.splitlines() if "non-finite loss" in line]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss by step 3 (")
    assert "lower the learning rates" in errors[0]
    assert not driver_tracebacks(out + err)
    assert out.count("worker 0: ") == 1, "the worker group started once (max_failures=1 would restart it)"
    assert "restored step" not in out
    client = MlflowClient(mlflow_server)
    (run,) = runs_named(client, "nan")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "non_finite_loss" and run.data.tags["failure.step"] == "3"
    assert steps_of(client, run.info.run_id, "g/pix") == [1, 2]
