"""The logged model outside this repository: loaded and served by `mlflow models serve` from a Python
environment where neither `gan_core` nor `jobs` can be imported, answering real HTTP requests.

The environment: a fresh venv whose site-packages path lists this venv's site-packages as a plain path
(a `.pth` line), so the third-party packages are there but the editable install of this project (itself a
`.pth` hook, which Python runs only in real site dirs) is not; the working dir is a temporary folder, so
the checkout is not on sys.path either. The test first checks that `import gan_core` fails there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.jobs.conftest import free_port, stop_process_group, wait_for_http

pytestmark = pytest.mark.slow


def _bare_env(root):
    """(python of a venv without this project, environment variables for it)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "third_party.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    # Console scripts MLflow runs (uvicorn) must use this interpreter, not the project's venv.
    uvicorn = venv / "bin" / "uvicorn"
    uvicorn.write_text(f'#!/bin/sh\nexec "{python}" -m uvicorn "$@"\n')
    uvicorn.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return python, env


def _wait_until_serving(server, port: int, log, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except TimeoutError:
            pass
    raise TimeoutError(f"mlflow models serve did not answer in {timeout} s: {log.read_text()[-3000:]}")


def _png(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, fmt)
    return buffer.getvalue()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_model_without_the_project_answers_images_of_two_sizes(tmp_path):
    import mlflow
    import torch

    from gan_core.checkpoint import save_generator
    from gan_core.models import rrdb_tiny
    from jobs.tracking.pyfunc import log_generator_model

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serving")
    torch.manual_seed(0)
    generator_file = save_generator(tmp_path / "generator.pt", rrdb_tiny(res_scale=0.3))
    with mlflow.start_run():
        info = log_generator_model(generator_file, name="served", registered_model_name="served-sr")
    model_uri = "models:/served-sr/1"

    rng = np.random.default_rng(0)
    small = (rng.random((20, 28, 3)) * 255).astype(np.uint8)
    other = (rng.random((13, 9, 3)) * 255).astype(np.uint8)
    inputs = [_png(small), _png(other, "JPEG")]
    in_process = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": inputs}))["image"]

    python, env = _bare_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    probe = subprocess.run([str(python), "-c", "import gan_core"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'gan_core'" in probe.stderr
    # The model itself loads there (its code travels with it) and predicts the same bytes.
    loaded = subprocess.run(
        [str(python), "-c",
         "import sys, mlflow, pandas as pd, base64, json; m = mlflow.pyfunc.load_model(sys.argv[1]); "
         "frame = pd.DataFrame({'image': [base64.b64decode(x) for x in json.loads(sys.argv[2])]}); "
         "print(json.dumps([base64.b64encode(b).decode() for b in m.predict(frame)['image']]))",
         model_uri, json.dumps([base64.b64encode(x).decode() for x in inputs])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert [base64.b64decode(x) for x in json.loads(loaded.stdout.strip().splitlines()[-1])] == list(in_process)

    port = free_port()
    server = subprocess.Popen(
        [str(python), "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        _wait_until_serving(server, port, tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}/invocations"
        status, answer = _post(url, {"dataframe_split": {
            "columns": ["image"], "data": [[base64.b64encode(x).decode()] for x in inputs]}})
        assert status == 200, answer
        served = [base64.b64decode(row["image"]) for row in answer["predictions"]]
        assert served == list(in_process)  # the same PNG bytes as in-process predict
        shapes = [np.asarray(Image.open(io.BytesIO(png))).shape for png in served]
        assert shapes == [(80, 112, 3), (52, 36, 3)]

        status, answer = _post(url, {"dataframe_split": {"columns": ["image"],
                                                         "data": [[base64.b64encode(b"not an image").decode()]]}})
        assert status == 400 and "stack_trace" not in answer
        reason = answer["message"].splitlines()[-1]
        assert "row 0" in reason and "cannot decode image" in reason, answer["message"]
        status, answer = _post(url, {"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}})
        assert status == 400 and "image" in answer["message"].splitlines()[-1]
    finally:
        stop_process_group(server)
