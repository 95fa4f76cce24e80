"""Every task served like super-resolution: the pyfunc model of gray (1 -> 1) and fusion (2 -> 1) generators,
in-process and through `mlflow models serve`. Fusion requests carry the infrared image in an `ir` column."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from gan_core.checkpoint import save_generator
from gan_core.inference import enhance
from gan_core.models import build_generator, rrdb_tiny
from jobs.tracking.pyfunc import GeneratorModel, log_generator_model


def _generator_file(path, in_ch: int, out_ch: int, task: dict | None):
    torch.manual_seed(0)
    generator = build_generator(scale=1, num_in_ch=in_ch, num_out_ch=out_ch, num_feat=8, num_block=1,
                                num_grow_ch=4).eval()
    return save_generator(path, generator, 1, task=task), generator


def _model(generator_file) -> GeneratorModel:
    """The pyfunc model as MLflow builds it, without logging it (load_context on the generator file)."""
    model = GeneratorModel()
    model.load_context(SimpleNamespace(artifacts={"generator": str(generator_file)}, model_config={"tile": 16}))
    return model


def _png(img: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "PNG")
    return buffer.getvalue()


def _decoded(png: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(png)) as im:
        return im.mode, np.asarray(im)


def _pair(height: int = 21, width: int = 27) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    visible = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return (rng.random((height, width)) * 255).astype(np.uint8), visible


@pytest.fixture(scope="module")
def fusion(tmp_path_factory):
    return _generator_file(tmp_path_factory.mktemp("fusion") / "fusion.pt", 2, 1, {"name": "fusion"})


def test_fusion_model_takes_pairs_and_answers_colour_or_gray(fusion):
    generator_file, generator = fusion
    model = _model(generator_file)
    ir, visible = _pair()
    expected = enhance(generator, visible, 1, ir=ir, tile=16)
    answer = model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [_png(ir)]}))["image"]
    mode, fused = _decoded(answer[0])
    assert mode == "RGB" and fused.shape == (21, 27, 3)
    np.testing.assert_array_equal(fused, expected)
    gray = model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [_png(ir)]}), params={"gray": True})
    mode, fused_gray = _decoded(gray["image"][0])
    assert mode == "L" and fused_gray.shape == (21, 27)
    # Arrays: one pair, or lists of pairs.
    np.testing.assert_array_equal(model.enhance(visible, ir=ir), expected)
    outs = model.enhance([visible, visible[:12]], ir=[ir, ir[:12]], gray=True)
    assert [out.shape for out in outs] == [(21, 27), (12, 27)]


def test_fusion_request_without_ir_or_with_a_bad_pair_is_refused(fusion):
    model = _model(fusion[0])
    ir, visible = _pair()
    with pytest.raises(MlflowException, match="fusion .*2 -> 1 channels.*'ir' column") as info:
        model.predict(None, pd.DataFrame({"image": [_png(visible)]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 from the scoring server
    with pytest.raises(MlflowException, match="'ir' column"):
        model.enhance(visible)
    with pytest.raises(MlflowException, match="row 0: the infrared image is 27x21 px, the visible image 27x20 px"):
        model.predict(None, pd.DataFrame({"image": [_png(visible[:20])], "ir": [_png(ir)]}))
    with pytest.raises(MlflowException, match="row 0: the infrared image has colour"):
        model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [_png(visible[:, ::-1].copy())]}))
    with pytest.raises(MlflowException, match="cannot decode image 'row 0 ir'"):
        model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [b"not an image"]}))


def test_models_that_are_not_fusion_refuse_an_ir_column(tmp_path):
    gray_file, gray_generator = _generator_file(tmp_path / "gray.pt", 1, 1, {"name": "denoise", "gray": True})
    gray_model = _model(gray_file)
    ir, visible = _pair()
    mode, out = _decoded(gray_model.predict(None, pd.DataFrame({"image": [_png(visible)]}))["image"][0])
    assert mode == "L" and out.shape == (21, 27)
    np.testing.assert_array_equal(out, enhance(gray_generator, visible, 1, tile=16))
    with pytest.raises(MlflowException, match="column 'ir' is for fusion models; this model is denoise \\(1 -> 1"):
        gray_model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [_png(ir)]}))
    with pytest.raises(MlflowException, match="param gray is for fusion models"):
        gray_model.predict(None, pd.DataFrame({"image": [_png(visible)]}), params={"gray": True})
    torch.manual_seed(0)
    sr_file = save_generator(tmp_path / "sr.pt", rrdb_tiny(), 1)
    sr_model = _model(sr_file)
    assert sr_model.tile_batch == 1  # on the CPU one tile per pass by default (8 on a GPU)
    one_by_one = sr_model.enhance(visible)
    assert one_by_one.shape == (84, 108, 3)
    # tile_batch, per call or as a param: tiles of a row in one pass, the same image (a rounding tie at most)
    batched = _decoded(sr_model.predict(None, pd.DataFrame({"image": [_png(visible)]}),
                                        params={"tile": 8, "tile_batch": 4})["image"][0])[1]
    assert np.abs(batched.astype(int) - sr_model.enhance(visible, tile=8)).max() <= 1
    # bf16 on request: close to float32, and not the float32 computation itself
    bf16 = _decoded(sr_model.predict(None, pd.DataFrame({"image": [_png(visible)]}), params={"bf16": True})["image"][0])[1]
    difference = np.abs(bf16.astype(int) - one_by_one)
    assert 0 < difference.max() <= 3 and difference.mean() < 0.2, (difference.max(), difference.mean())
    with pytest.raises(MlflowException, match="column 'ir' is for fusion models; this model is sr \\(3 -> 3"):
        sr_model.predict(None, pd.DataFrame({"image": [_png(visible)], "ir": [_png(ir)]}))
    with pytest.raises(MlflowException, match="'ir' is for fusion models"):
        sr_model.enhance(visible, ir=ir)


def test_logged_fusion_model_names_its_task_and_checks_the_optional_ir_column(fusion, tmp_path):
    import mlflow

    generator_file, generator = fusion
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("task-serving")
    with mlflow.start_run():
        info = log_generator_model(generator_file, name="fusion")
    assert info.metadata["task"] == "fusion" and info.metadata["channels"] == "2->1"
    assert mlflow.get_logged_model(info.model_id).tags["task"] == "fusion"
    model = mlflow.pyfunc.load_model(info.model_uri)
    columns = [(spec.name, spec.required) for spec in model.metadata.get_input_schema().inputs]
    assert columns == [("image", True), ("ir", False)]
    ir, visible = _pair()
    answer = model.predict(pd.DataFrame({"image": [_png(visible)], "ir": [_png(ir)]}))["image"]
    np.testing.assert_array_equal(_decoded(answer[0])[1], enhance(generator, visible, 1, ir=ir, tile=256))
    with pytest.raises(MlflowException, match="'ir' column"):
        model.predict(pd.DataFrame({"image": [_png(visible)]}))


@pytest.mark.slow
def test_served_fusion_model_answers_a_pair_and_refuses_a_request_without_ir(fusion, tmp_path):
    import mlflow

    from tests.jobs.conftest import free_port, stop_process_group
    from tests.jobs.test_serving import _post, _wait_until_serving

    generator_file, generator = fusion
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("task-serving")
    with mlflow.start_run():
        info = log_generator_model(generator_file, name="fusion")
    port = free_port()
    # This venv's python, and its console scripts (MLflow execs uvicorn) first on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", info.model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_serving(server, port, tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}/invocations"
        ir, visible = _pair()
        encoded = [base64.b64encode(_png(img)).decode() for img in (visible, ir)]
        status, answer = _post(url, {"dataframe_split": {"columns": ["image", "ir"], "data": [encoded]}})
        assert status == 200, answer
        fused = _decoded(base64.b64decode(answer["predictions"][0]["image"]))[1]
        np.testing.assert_array_equal(fused, enhance(generator, visible, 1, ir=ir, tile=256))
        status, answer = _post(url, {"dataframe_split": {"columns": ["image"], "data": [encoded[:1]]}})
        assert status == 400 and "'ir' column" in answer["message"].splitlines()[-1], answer
    finally:
        stop_process_group(server)
