"""Denoising, low-light enhancement and IR + visible fusion through the same jobs as super-resolution, on a real
local Ray cluster and a real mlflow server: jobs.train (2 DDP workers) with each task's demo recipe, the logged
pyfunc model, jobs.promote's gate on the task's gain, jobs.enhance with the promoted model, and a jobs.tune sweep.

Each run is the shipped recipe shrunk to seconds (tiny_overrides); what the full recipes reach is measured in the
README, not here.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from gan_core.task_config import TASK_METRIC_KEYS
from jobs import enhance, prepare_data, promote, train, tune
from tests.jobs.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
GAIN = {"denoise": "gain_psnr_y", "lowlight": "gain_psnr_y", "fusion": "gain_qabf"}


def recipe(task: str) -> str:
    return str(REPO / "jobs" / "configs" / f"{task}_demo.yaml")


@pytest.fixture(scope="module")
def fusion_data(tmp_path_factory):
    """The synthetic IR / visible demo pairs, as `prepare_data --demo --task fusion` writes them: ir/ and vi/
    folders (train, val) and the paired shards made from train/, the layout of TNO / RoadScene / LLVIP."""
    root = tmp_path_factory.mktemp("fusion-demo")
    prepare_data.main(["--demo", "--task", "fusion", "--root", str(root)])
    return root / "fusion"


def data_overrides(task: str, demo_data, fusion_data) -> dict[str, str]:
    if task == "fusion":
        return {"data.train": str(fusion_data / "train_shards"), "data.val": str(fusion_data / "val")}
    # denoise / lowlight: clean photos; the noisy or dark inputs are drawn per patch during training
    return {"data.train": str(demo_data / "train_shards"), "data.val": str(demo_data / "val")}


def enhance_inputs(task: str, folder, fusion_data) -> None:
    """Two small inputs of the task: RGB images, or for fusion ir/ and vi/ pairs cut from the demo pairs."""
    if task == "fusion":
        for side in ("ir", "vi"):
            (folder / side).mkdir(parents=True)
            for index, src in enumerate(sorted((fusion_data / "val" / side).iterdir())[:2]):
                with Image.open(src) as im:
                    im.crop((0, 0, 40, 36)).save(folder / side / f"pair{index}.png")
        return
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"img{index}.png")


# lowlight differs from denoise only in how the synthetic input is drawn (gan_core.tasks.Restoration.make_input,
# trained in-process by tests/gan_core/test_tasks.py::test_each_task_trains_and_validates); one Train run less
# here (~40 s of CI's 30 minutes).
@pytest.mark.parametrize("task", ["denoise", "fusion"])
def test_task_trains_on_ray_is_promoted_on_its_gain_and_enhances(task, ray_local, mlflow_server, demo_data,
                                                                 fusion_data, tmp_path):
    data = data_overrides(task, demo_data, fusion_data)
    metrics = train.main(["--config", recipe(task), "--num-workers", "2", "--name", f"{task}-tiny",
                          "--tracking-uri", mlflow_server, *tiny_overrides(demo_data, tmp_path / "runs", 4, **data)])
    assert metrics["step"] == 4

    # Tracked like SR, with the task's own validation metrics and baseline.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"gan-enhance-{task}-demo")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`gan.run_name` = '" + f"{task}-tiny'")
    assert run.info.status == "FINISHED"
    assert run.data.params["task.name"] == task and run.data.params["generator.pixel_unshuffle"] == "False"
    logged = {key.removeprefix("val/") for key in run.data.metrics if key.startswith("val/")}
    assert set(TASK_METRIC_KEYS[task]) - {"lpips"} <= logged, logged
    assert [m.step for m in client.get_metric_history(run.info.run_id, f"val/{GAIN[task]}")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d/real")] == [3, 4]  # a GAN phase ran

    # The logged pyfunc model: fusion answers one gray image per (visible, infrared) pair, the others RGB.
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"]).unwrap_python_model()
    rgb = np.full((16, 20, 3), 90, np.uint8)
    if task == "fusion":
        out = model.enhance(rgb, ir=np.full((16, 20), 200, np.uint8))
        assert out.shape == (16, 20) and out.dtype == np.uint8
    else:
        assert model.enhance(rgb).shape == (16, 20, 3)

    # The gate measures the task's gain over its own baseline on held-out data: an impossible margin is refused
    # (dry run: nothing registered), a lenient one promotes.
    common = ["--registered-model", f"{task}-tiny", "--run-id", run.info.run_id, "--data", data["data.val"],
              "--crop", "64", "--max-images", "2", "--tracking-uri", mlflow_server]
    refused = promote.main([*common, "--min-gain", "100", "--dry-run"])
    assert refused["decision"] == "dry-run" and refused["would_promote"] is False
    assert GAIN[task].removeprefix("gain_") in refused["reason"].lower().replace("-", "_"), refused["reason"]
    promoted = promote.main([*common, "--min-gain", "-100"])
    assert promoted["decision"] == "promoted", promoted
    version = client.get_model_version_by_alias(f"{task}-tiny", "champion")
    assert version.tags["task"] == task

    # Batch enhancement with the promoted model, on the task's own input layout.
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    enhance_inputs(task, inputs, fusion_data)
    enhance.main(["--model", f"models:/{task}-tiny@champion", "--input", str(inputs), "--output", str(outputs),
                  "--tracking-uri", mlflow_server])
    written = sorted(path.name for path in outputs.rglob("*.png"))
    assert written == (["pair0.png", "pair1.png"] if task == "fusion" else ["img0.png", "img1.png"]), written
    with Image.open(next(outputs.rglob("*.png"))) as im:
        assert im.size == (40, 36) and im.mode == "RGB"  # fusion: the fused luma coloured by the visible chroma


def test_fusion_sweep_ranks_trials_by_qabf(ray_local, mlflow_server, demo_data, fusion_data, tmp_path):
    """jobs.tune on a task recipe: the space's metric is the task's (val/qabf), every trial a Train run."""
    space = tmp_path / "fusion.yaml"
    space.write_text(f"base: {recipe('fusion')}\nmetric: val/qabf\nmode: max\nnum_samples: 1\n"
                     "param_space:\n  task.fusion_gradient_weight: {grid: [1.0, 8.0]}\n")
    summary = tune.main(["--space", str(space), "--workers-per-trial", "1", "--cpus-per-worker", "0.5",
                         "--trial-cpus", "0.5", "--name", "fusion-sweep", "--tracking-uri", mlflow_server,
                         *tiny_overrides(demo_data, tmp_path / "runs", 2, **data_overrides("fusion", demo_data,
                                                                                           fusion_data))])
    rows = summary["trials"]
    assert sorted(row["params"]["task.fusion_gradient_weight"] for row in rows) == [1.0, 8.0]
    assert all(row["status"] == "finished" and row["step"] == 2 for row in rows), rows
    assert summary["best"]["metric_best"] == max(row["metric_best"] for row in rows)
    parent = MlflowClient(mlflow_server).get_run(summary["parent_run_id"])
    assert parent.data.metrics["best/val/qabf"] == pytest.approx(summary["best"]["metric_best"])


def test_fusion_on_unpaired_shards_fails_before_training(ray_local, demo_data, tmp_path):
    """Plain photo shards (no `input` column) cannot train fusion: a clear error before any worker starts."""
    from gan_core.config import load_config
    from jobs.cli import JobError
    from jobs.training.trainer import build_trainer

    cfg = load_config(recipe("fusion"), [f"data.train={demo_data / 'train_shards'}", f"data.val={demo_data / 'val'}",
                                         "run.name=unpaired"])
    with pytest.raises(JobError, match="task fusion trains on IR / visible pairs.*--task fusion"):
        build_trainer(cfg, num_workers=2, use_gpu=False, loop_config={})
