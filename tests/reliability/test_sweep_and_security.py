"""Sweeps that fail say so, and nothing the jobs write gives away code execution or a password.

- `python -m jobs.tune` exits 1 when a trial errored or none reported the metric (`sweep_failure`);
  the real sweeps are in tests/jobs/test_tune.py.
- The registered model is MLflow "models from code": no pickle in it, and a process that refuses pickles
  (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) loads and runs it.
- A tracking URI with `user:password@` never shows its password in an error or a printed line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.cli import JobError, run_main

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-pw"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


def credentialed_uri() -> str:
    return f"http://gan:{SECRET}@127.0.0.1:{closed_port()}"


# -- a sweep's exit status -------------------------------------------------------


def _row(trial: str, status: str, best: float | None = None) -> dict:
    return {"trial": trial, "status": status, "metric_best": best}


@pytest.mark.parametrize(("statuses", "expected"), [
    (["finished", "stopped early"], None),
    (["error", "error"], "all 2 trial(s) errored (t0, t1): no trial reported val/psnr_y"),
    (["finished", "error"], "1 of 2 trial(s) errored (t1;"),
    (["finished", "interrupted"], "the sweep was interrupted: 1 of 2 trial(s) did not finish"),
])
def test_sweep_failure_names_what_went_wrong(statuses, expected):
    from jobs.sweeps.report import best_row, sweep_failure

    rows = [_row(f"t{i}", status, None if status == "error" else 27.0 + i) for i, status in enumerate(statuses)]
    failure = sweep_failure(rows, best_row(rows, "max"), "val/psnr_y")
    assert failure == expected if expected is None else failure.startswith(expected), failure


def test_no_metric_at_all_fails_the_sweep_even_without_errors():
    from jobs.sweeps.report import sweep_failure

    assert sweep_failure([_row("t0", "finished")], None, "val/psnr_y") == "no trial reported val/psnr_y"


def test_tune_command_exits_1_when_the_sweep_failed(monkeypatch):
    from jobs import tune

    monkeypatch.setattr(tune, "main", lambda argv=None: {"failure": "all 2 trial(s) errored"})
    with pytest.raises(SystemExit) as exited:
        run_main(tune.cli)
    assert exited.value.code == 1
    monkeypatch.setattr(tune, "main", lambda argv=None: {"failure": None})
    run_main(tune.cli)  # a successful sweep: no exit


# -- the logged model: code, not a pickle --------------------------------------


@pytest.fixture
def local_tracking(tmp_path):
    """A SQLite tracking store with its artifacts under tmp_path, as this process's MLflow default."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("security", artifact_location=str(tmp_path / "artifacts"))
    try:
        yield uri, experiment_id
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_logged_model_holds_no_pickle_and_loads_where_pickles_are_refused(local_tracking, tmp_path):
    import mlflow

    from gan_core.checkpoint import load_generator, save_generator
    from gan_core.inference import enhance_image
    from gan_core.models import rrdb_tiny
    from jobs.tracking import pyfunc
    from jobs.tracking.model_source import resolve_model

    uri, experiment_id = local_tracking
    torch.manual_seed(5)
    generator_file = save_generator(tmp_path / "generator.pt", rrdb_tiny(), step=1)
    with mlflow.start_run(experiment_id=experiment_id):
        info = pyfunc.log_generator_model(generator_file, name="generator", registered_model_name="secure-sr")

    # The model folder: MLmodel, this project's model code as a plain file, the generator; no pickle.
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "dl")))
    files = sorted(str(path.relative_to(local)) for path in local.rglob("*") if path.is_file())
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and Path(flavor["model_code_path"]).name == "pyfunc.py"
    assert (local / "pyfunc.py").read_text() == Path(pyfunc.__file__).read_text()
    assert flavor["config"] == {"tile": pyfunc.DEFAULT_TILE, "tile_overlap": pyfunc.DEFAULT_TILE_OVERLAP,
                                "max_pixels": pyfunc.DEFAULT_MAX_PIXELS}
    # The jobs' own reader still finds the generator artifact (MLmodel's artifacts.generator.path).
    source = resolve_model("models:/secure-sr/1", tmp_path / "resolved")
    assert source.path.name == "generator.pt" and load_generator(source.path).scale == 4

    # A fresh process that refuses every pickle loads the registered version by URI and predicts.
    img = np.random.default_rng(3).integers(0, 256, (24, 28, 3), dtype=np.uint8)
    np.save(tmp_path / "in.npy", img)
    script = (
        "import mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model('models:/secure-sr/1')\n"
        f"img = np.load(r'{tmp_path / 'in.npy'}')\n"
        f"np.save(r'{tmp_path / 'out.npy'}', model.unwrap_python_model().enhance(img, tile=16, tile_overlap=4))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = enhance_image(load_generator(generator_file), img, 4, torch.device("cpu"), tile=16, tile_overlap=4)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_importing_the_model_module_sets_no_mlflow_model():
    """The file's set_model line runs only in MLflow's copy, not when the jobs import it to log a model."""
    script = "import jobs.tracking.pyfunc, mlflow.models.model; print(mlflow.models.model.__mlflow_model__)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"


# -- passwords in tracking URIs ---------------------------------------------------


def test_mlflow_error_text_loses_the_password():
    from jobs.tracking.server import without_password

    uri = credentialed_uri()
    text = f"API request to {uri}/api/2.0/mlflow/runs/get failed"
    assert without_password(text, uri) == text.replace(SECRET, "***")
    assert without_password(text, "http://127.0.0.1:5000") == text  # no password: nothing to hide
    assert without_password("anything", "sqlite:////tmp/mlflow.db") == "anything"


def test_unreachable_server_error_shows_no_password():
    from jobs.tracking.server import check_tracking_server

    with pytest.raises(JobError) as raised:
        check_tracking_server(credentialed_uri(), timeout=2.0)
    message = str(raised.value)
    assert SECRET not in message and "gan:***@127.0.0.1" in message
    # The password no longer breaks the check itself: urllib took `gan:...@127.0.0.1` for the host name.
    assert "is unreachable" in message and "Name or service not known" not in message


def _space(tmp_path: Path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'configs' / 'demo.yaml'}\nnum_samples: 1\n"
                    "param_space:\n  optim.g_lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    return str(path)


JOBS = {  # each job's command line with an MLflow model or server: it checks the server before any work
    "tune": lambda tmp_path, uri: ("jobs.tune", ["--space", _space(tmp_path), "--tracking-uri", uri,
                                                 f"run.storage_path={tmp_path / 'runs'}",
                                                 f"data.train={tmp_path}", f"data.val={tmp_path}"]),
    "evaluate": lambda tmp_path, uri: ("jobs.evaluate", ["--model", "models:/sr@champion", "--data", str(tmp_path),
                                                         "--tracking-uri", uri]),
    "export": lambda tmp_path, uri: ("jobs.export", ["--model", "models:/sr@champion", "--data", str(tmp_path),
                                                     "--output", str(tmp_path / "out"), "--tracking-uri", uri]),
}


@pytest.fixture
def restored_mlflow_env(monkeypatch):
    """Undo what `connect` sets in os.environ (the variables absent before are removed again)."""
    for name in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_error_line_shows_no_password(job, tmp_path, capsys, restored_mlflow_env):
    import importlib

    module_name, argv = JOBS[job](tmp_path, credentialed_uri())
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: module.main(argv))
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "error: MLflow tracking server http://gan:***@127.0.0.1:" in captured.err


def test_sweep_summary_shows_no_password(tmp_path, capsys):
    from jobs.sweeps.report import print_summary
    from jobs.sweeps.space import load_space

    space = load_space(_space(tmp_path))
    uri = f"https://gan:{SECRET}@mlflow.internal:5000"
    failed = {"trial": "t0", "status": "error", "step": 0, "total_steps": 2, "metric_last": None,
              "metric_best": None, "params": {"optim.g_lr": 1e-4}, "exploits": [],
              "error": f"MlflowException: API request to {uri}/api/2.0/mlflow/runs/get failed with exception ..."}
    print_summary([failed], None, space, uri, "parent", str(tmp_path))
    print_summary([], None, space, "sqlite:////data/mlflow.db", "parent", str(tmp_path))
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "open MLflow:  https://gan:***@mlflow.internal:5000" in out
    assert "error in t0: MlflowException: API request to https://gan:***@mlflow.internal:5000/api/2.0/" in out
    assert "open MLflow:  mlflow ui --backend-store-uri sqlite:////data/mlflow.db" in out


def test_connect_stops_mlflow_printing_a_password_and_says_to_use_the_environment(restored_mlflow_env, capsys):
    """MLflow prints `View run ... at: <tracking URI>` whenever a run ends: off when the URI has a password.
    Its errors (`API request to <URI>/api/... failed`) would still show it: the job warns, without it."""
    import mlflow

    from jobs.tracking.server import connect

    previous = mlflow.get_tracking_uri()
    try:
        connect("http://127.0.0.1:5000", check=False)
        assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ and capsys.readouterr().err == ""
        connect(f"http://gan:{SECRET}@127.0.0.1:5000", check=False)
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    finally:
        mlflow.set_tracking_uri(previous)
    err = capsys.readouterr().err
    assert SECRET not in err and "http://gan:***@127.0.0.1:5000 carries credentials" in err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err


def test_every_job_error_line_hides_passwords_whatever_quoted_the_uri(capsys):
    # run_main is where every job prints its one error line: a password quoted by MLflow's own exception text
    # (which writes the URI as given) must not reach the terminal or a log.
    from jobs.cli import JobError, run_main
    from jobs.tracking.server import redact_text

    def fails():
        raise JobError("API request to http://gan:s3cret@127.0.0.1:5000/api/2.0/mlflow/runs/get failed")

    with pytest.raises(SystemExit):
        run_main(fails)
    err = capsys.readouterr().err
    assert "s3cret" not in err and "http://gan:***@127.0.0.1:5000/api" in err
    assert redact_text("sqlite:////tmp/mlflow.db and s3://bucket/x") == "sqlite:////tmp/mlflow.db and s3://bucket/x"
