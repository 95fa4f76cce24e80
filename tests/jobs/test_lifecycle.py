"""Evaluate, register, gated promotion, rollback, import and export against a real `mlflow server`.

Training runs are fabricated with MlflowClient (jobs.train is not run here): each has a tiny
generator whose quality is fixed by construction, so the expected decisions are certain:
    random   untrained rrdb_tiny                               ~ 9.4 dB PSNR-Y on the demo photos
    nearest  RRDB wired as a nearest-neighbour x4 upsampler     ~26.0 dB
    tent     nearest, then one 3x3 tent blur at 4x               ~27.5 dB
    tent2    nearest, then two 3x3 tent blurs at 4x              ~27.7 dB
(bicubic is ~28.3 dB on these 96 px crops). The tests run in file order and share one registry.
All of these are below bicubic by construction, so the promotions here lower the gate's bicubic floor
explicitly (PROMOTE_FLOOR); tests/jobs/test_promotion_gate.py runs the gate at its defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch

from gan_core.checkpoint import CHECKPOINT_FILE, load_generator, save_generator
from gan_core.data import prepare_demo_folders
from gan_core.models import rrdb_tiny

pytestmark = pytest.mark.slow

CROP = "96"
TINY = {"name": "rrdb", "scale": 4, "num_feat": 16, "num_block": 1, "num_grow_ch": 8, "res_scale": 0.2}
# These tests are about margins, concurrency and crash recovery, with models up to 2.3 dB below bicubic.
PROMOTE_FLOOR = ("--min-gain-db", "-3.0")


def upsampler(kind: str) -> torch.nn.Module:
    """An rrdb_tiny of known quality (see the module docstring)."""
    torch.manual_seed(7)
    generator = rrdb_tiny()
    if kind == "random":
        return generator
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    tent = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    kernels = {"conv_first": identity, "conv_up1": identity, "conv_up2": identity,
               "conv_hr": tent if kind in ("tent", "tent2") else identity,
               "conv_last": tent if kind == "tent2" else identity}
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.zero_()  # the trunk then adds nothing: feat + conv_body(...) = feat
        for name, kernel in kernels.items():
            conv = getattr(generator, name)
            for channel in range(3):
                conv.weight[channel, channel] = kernel
    return generator.eval()


def save_checkpoint_dir(generator: torch.nn.Module, directory) -> None:
    save_generator(directory / CHECKPOINT_FILE, generator, step=1)


@pytest.fixture(scope="module")
def world(mlflow_server, tmp_path_factory):
    """The tracking server, demo validation photos, and names unique to this module."""
    return make_world(mlflow_server, tmp_path_factory.mktemp("lifecycle"))


def make_world(mlflow_server: str, root) -> dict:
    """What `world` holds; other modules build their own (their own experiment and registered model)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(1)
    _, val_dir = prepare_demo_folders(root / "demo")
    mlflow.set_tracking_uri(mlflow_server)
    tag = uuid.uuid4().hex[:8]
    return {"uri": mlflow_server, "root": root, "val": str(val_dir), "client": MlflowClient(mlflow_server),
            "experiment": f"lifecycle-{tag}", "model": f"sr-{tag}", "runs": {}}


def fake_training_run(world, kind: str, claimed_psnr: float, log_model: bool = True,
                      generator: torch.nn.Module | None = None) -> str:
    """A finished 'training run' as jobs.train leaves it: params, val metrics, checkpoint, logged model.

    The generator is `upsampler(kind)` unless one is given.
    """
    import mlflow

    from jobs.tracking.pyfunc import log_generator_model

    client = world["client"]
    found = client.get_experiment_by_name(world["experiment"])
    experiment_id = found.experiment_id if found else client.create_experiment(world["experiment"])
    run = client.create_run(experiment_id, run_name=f"{kind}-{len(world['runs'])}")
    run_id = run.info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(f"generator.{k}", str(v)) for k, v in TINY.items()]
                     + [mlflow.entities.Param("data.val", world["val"])])
    for key, value in {"val/psnr_y": claimed_psnr, "val/ssim_y": 0.7, "val/gain_psnr_y": claimed_psnr - 28.3}.items():
        client.log_metric(run_id, key, value, step=10)
    directory = world["root"] / "checkpoints" / run_id
    save_checkpoint_dir(upsampler(kind) if generator is None else generator, directory)
    client.set_tag(run_id, "checkpoint_location", str(directory))
    if log_model:
        mlflow.set_experiment(experiment_id=experiment_id)  # jobs.import_weights may have set another one
        with mlflow.start_run(run_id=run_id):
            info = log_generator_model(directory / "checkpoint.pt", name="generator")
        client.set_tag(run_id, "model_uri", info.model_uri)
    client.set_terminated(run_id, status="FINISHED")
    world["runs"][kind] = run_id
    return run_id


def promote(world, *extra: str) -> dict:
    from jobs.promote import main

    return main(["--experiment", world["experiment"], "--registered-model", world["model"], "--metric",
                 "val/psnr_y", "--crop", CROP, "--tracking-uri", world["uri"], *PROMOTE_FLOOR, *extra])


def version_tags(world, version) -> dict:
    return world["client"].get_model_version(world["model"], str(version)).tags


def champion(world) -> str:
    return world["client"].get_model_version_by_alias(world["model"], "champion").version


def test_first_model_is_promoted_with_its_evaluation(world, capsys):
    fake_training_run(world, "nearest", claimed_psnr=26.0)
    # At the default floor (beat bicubic) even a first model 2.3 dB below bicubic is refused.
    at_default = promote(world, "--min-gain-db", "0", "--dry-run")
    assert at_default["would_promote"] is False and at_default["failed"] == ["gain"]
    result = promote(world)
    assert result["decision"] == "promoted" and champion(world) == result["version"] == "1"
    tags = version_tags(world, 1)
    assert tags["promotion.decision"] == "promoted" and "no version holds" in tags["promotion.reason"]
    assert 25.5 < float(tags["eval.psnr_y"]) < 26.5 and float(tags["eval.bicubic_psnr_y"]) > 28.0
    description = world["client"].get_model_version(world["model"], "1").description
    assert "PSNR-Y" in description and "bicubic" in description
    assert "PROMOTED" in capsys.readouterr().out


def test_margin_is_enforced(world, capsys):
    run_id = fake_training_run(world, "tent", claimed_psnr=27.5)
    result = promote(world, "--run-id", run_id, "--min-improvement", "5.0")
    assert result["decision"] == "refused" and champion(world) == "1"
    reason = version_tags(world, result["version"])["promotion.reason"]
    assert "does not beat version 1" in reason and "required > 5" in reason
    assert 1.0 < result["candidate"] - result["holder_value"] < 2.0  # it is better, just not by 5 dB
    assert "REFUSED" in capsys.readouterr().out


def test_worse_model_with_inflated_training_metric_is_refused(world, capsys):
    # The random generator claims the best training metric: it is chosen as the candidate, and the
    # held-out re-evaluation exposes it.
    run_id = fake_training_run(world, "random", claimed_psnr=99.0)
    result = promote(world)
    assert result["run_id"] == run_id and result["decision"] == "refused"
    assert result["candidate"] < 15.0 and champion(world) == "1"
    tags = version_tags(world, result["version"])
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.compared_to_version"] == "1" and "does not beat version 1" in tags["promotion.reason"]
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and "does not beat version 1" in printed
    # Promoting again registers nothing new: that run is already a version.
    again = promote(world)
    assert again["decision"] == "already-registered"
    assert len(world["client"].search_model_versions(f"name = '{world['model']}'")) == 3


def test_dry_run_registers_nothing(world):
    run_id = fake_training_run(world, "tent", claimed_psnr=27.5, log_model=False)
    result = promote(world, "--run-id", run_id, "--dry-run")
    assert result["decision"] == "dry-run" and result["would_promote"] is True
    assert len(world["client"].search_model_versions(f"name = '{world['model']}'")) == 3


def test_concurrent_promotions_leave_the_alias_on_the_best_ready_version(world):
    # Both beat version 1; whichever order the registry sees them in, the compare-and-set under the
    # lock makes the later one compare against the earlier one, so the alias ends on the better.
    # The tent run has no logged model (the dry run above): promote logs one from its checkpoint.
    tent = world["runs"]["tent"]
    tent2 = fake_training_run(world, "tent2", claimed_psnr=27.7)
    results: dict[str, dict] = {}

    def run(name, run_id):
        results[name] = promote(world, "--run-id", run_id)

    threads = [threading.Thread(target=run, args=(name, run_id)) for name, run_id in (("tent", tent), ("tent2", tent2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert set(results) == {"tent", "tent2"}
    best = results["tent2"]["version"]
    assert champion(world) == best and results["tent2"]["decision"] == "promoted"
    assert world["client"].get_model_version(world["model"], best).status == "READY"
    other = results["tent"]
    # Either tent lost to tent2 (refused), or it won against version 1 first and was superseded.
    if other["decision"] == "refused":
        assert other["holder"] == best
    else:
        assert other["decision"] == "promoted"
        assert version_tags(world, other["version"])["promotion.superseded_by"] == best
    registered = world["client"].search_registered_models(f"name LIKE '{world['model']}%'")
    assert [m.name for m in registered] == [world["model"]], "the promotion lock was left behind"


def test_a_promotion_that_died_after_registering_is_finished_by_the_next(world, capsys):
    # Simulate the crash: the version exists, READY, with its decision still pending.
    run_id = fake_training_run(world, "tent", claimed_psnr=27.5)
    model_uri = world["client"].get_run(run_id).data.tags["model_uri"]
    from jobs.tracking.registry import register_version

    crashed = register_version(world["client"], world["model"], model_uri, {"promotion.decision": "pending"})
    count = len(world["client"].search_model_versions(f"name = '{world['model']}'"))
    result = promote(world, "--run-id", run_id)
    assert result["version"] == crashed.version and result["decision"] == "refused"  # tent < tent2, the champion
    assert version_tags(world, crashed.version)["promotion.decision"] == "refused"
    assert len(world["client"].search_model_versions(f"name = '{world['model']}'")) == count
    assert "resuming the undecided" in capsys.readouterr().out


def test_rollback_and_forward(world, capsys):
    from jobs.promote import main

    best = champion(world)
    result = main(["--registered-model", world["model"], "--alias", "champion", "--version", "1",
                   "--tracking-uri", world["uri"]])
    assert result == {"decision": "rollback", "version": "1", "previous": best} and champion(world) == "1"
    assert "moved from version" in version_tags(world, 1)["promotion.rollback"]
    main(["--registered-model", world["model"], "--version", best, "--tracking-uri", world["uri"]])
    assert champion(world) == best
    assert f"version 1 -> {best}" in capsys.readouterr().out


def test_champion_loads_by_alias_in_a_fresh_process(world, tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    np.save(tmp_path / "in.npy", img)
    script = (
        "import mlflow, numpy as np, sys\n"
        f"model = mlflow.pyfunc.load_model('models:/{world['model']}@champion')\n"
        f"img = np.load(r'{tmp_path / 'in.npy'}')\n"
        "out = model.unwrap_python_model().enhance(img)\n"
        "outs = model.unwrap_python_model().enhance([img, img[:20, :30]], tile=16, tile_overlap=8)\n"
        f"np.save(r'{tmp_path / 'out.npy'}', out)\n"
        "print('shapes', out.shape, out.dtype, [o.shape for o in outs])\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"]}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shapes (160, 208, 3) uint8 [(160, 208, 3), (80, 120, 3)]" in done.stdout
    from gan_core.inference import enhance_image

    expected = enhance_image(upsampler("tent2"), img, 4)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_evaluate_job_table_json_and_logging(world, capsys):
    from jobs.evaluate import main

    result = main(["--model", f"models:/{world['model']}@champion", "--data", world["val"], "--crop", CROP,
                   "--tracking-uri", world["uri"], "--json"])
    metrics = result["metrics"]
    assert 27.4 < metrics["psnr_y"] < 28.0 and metrics["bicubic_psnr_y"] > metrics["psnr_y"]
    assert {"psnr", "ssim", "psnr_y", "ssim_y", "bicubic_ssim_y", "gain_psnr_y"} <= set(metrics)
    assert any("LPIPS skipped" in note for note in result["notes"])  # no AlexNet weights on this machine
    assert json.loads(capsys.readouterr().out)["images"] == 3
    run = world["client"].get_run(result["logged_to_run"])
    assert run.info.run_id == world["runs"]["tent2"]
    assert abs(run.data.metrics["eval/val/psnr_y"] - metrics["psnr_y"]) < 1e-9
    # The table form, from a checkpoint folder (no MLflow run: nothing logged).
    main(["--model", str(world["root"] / "checkpoints" / world["runs"]["nearest"]), "--data", world["val"],
          "--crop", CROP, "--scale", "4"])
    table = capsys.readouterr().out
    assert "PSNR-Y (dB)" in table and "bicubic" in table and "logged" not in table


def test_import_weights_registers_basicsr_file(world, tmp_path, capsys):
    from jobs.cli import JobError
    from jobs.import_weights import main

    path = tmp_path / "ESRGAN_tiny_x4.pth"
    torch.save({"params": upsampler("random").state_dict(), "params_ema": upsampler("tent").state_dict()}, path)
    with pytest.raises(JobError, match="res_scale or upsample_skip.*--arch|arch.*basicsr"):
        main(["--basicsr", str(path), "--registered-model", world["model"], "--tracking-uri", world["uri"]])
    result = main(["--basicsr", str(path), "--arch", "basicsr", "--registered-model", world["model"], "--data", world["val"],
                   "--crop", CROP, "--experiment", world["experiment"] + "-imports", "--tracking-uri", world["uri"]])
    assert result["generator"]["num_block"] == 1 and result["generator"]["scale"] == 4
    assert 27.0 < result["metrics"]["psnr_y"] < 27.8  # params_ema (the tent upsampler) was taken, not params
    tags = version_tags(world, result["version"])
    assert tags["source"] == "basicsr" and len(tags["source_sha256"]) == 64 and "eval.psnr_y" in tags
    from jobs.tracking.model_source import resolve_model

    source = resolve_model(f"models:/{world['model']}/{result['version']}", tmp_path / "dl")
    loaded = load_generator(source.path)
    for name, tensor in upsampler("tent").state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert main(["--basicsr", str(path), "--arch", "basicsr", "--registered-model", world["model"],
                 "--tracking-uri", world["uri"]])[
        "existing"] is True
    assert "already" in capsys.readouterr().out


def test_model_source_forms_resolve_to_the_same_weights(world, tmp_path):
    from jobs.cli import JobError
    from jobs.tracking.model_source import local_checkpoint_file, resolve_model

    run_id = world["runs"]["tent2"]
    expected = upsampler("tent2").state_dict()
    for spec in (f"runs:/{run_id}", f"runs:/{run_id}/generator", f"models:/{world['model']}@champion",
                 str(world["root"] / "checkpoints" / run_id)):
        source = resolve_model(spec, tmp_path / spec.replace("/", "_").replace(":", ""))
        loaded = load_generator(source.path).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), spec
        assert source.run_id in (run_id, None), spec
    # A Ray Train storage folder: the newest checkpoint_* inside it.
    for index in (1, 12, 3):
        save_checkpoint_dir(upsampler("nearest"), tmp_path / "ray_run" / f"checkpoint_{index:06d}")
    assert local_checkpoint_file(tmp_path / "ray_run").parent.name == "checkpoint_000012"
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="holds no checkpoint.pt"):
        local_checkpoint_file(tmp_path / "empty")


def test_export_job_on_the_champion(world, tmp_path, capsys):
    from jobs.export import main

    result = main(["--model", f"models:/{world['model']}@champion", "--data", world["val"], "--crop", CROP,
                   "--output", str(tmp_path / "exported"), "--tracking-uri", world["uri"]])
    printed = capsys.readouterr().out
    assert "max |onnxruntime - torch|" in printed and "int8" in printed
    assert result["onnx"]["max_abs_diff"] < 1e-4
    assert result["int8"]["size_ratio"] < 0.5 and result["int8"]["psnr_y_change"] > -1.0
    assert (tmp_path / "exported" / "generator.onnx").is_file()
    assert (tmp_path / "exported" / "generator_int8.pt").is_file()
    # rrdb_tiny grows 8 channels, not BasicSR's 32: the safetensors file is ours only, and says so.
    portable = result["portable"]
    assert not portable["loadable_elsewhere"] and portable["pth"] is None
    assert "num_grow_ch is 8" in portable["problems"][0] and "loads in gan_core only" in printed
    import spandrel

    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_file(portable["safetensors"])


def test_user_errors_exit_2_with_one_line(world, tmp_path, capsys):
    from jobs import evaluate
    from jobs import promote as promote_job
    from jobs.cli import run_main

    cases = [
        (evaluate.main, ["--model", str(tmp_path / "nope"), "--data", world["val"]], "no such file or folder"),
        (evaluate.main, ["--model", f"models:/{world['model']}@nobody", "--data", world["val"],
                         "--tracking-uri", world["uri"]], "cannot be downloaded"),
        (evaluate.main, ["--model", "ftp://bucket/x", "--data", world["val"]], "unknown URI"),
        (evaluate.main, ["--model", str(world["root"] / "checkpoints" / world["runs"]["nearest"]), "--data",
                         str(tmp_path / "none")], "no such folder"),
        (evaluate.main, ["--model", str(world["root"] / "checkpoints" / world["runs"]["nearest"]), "--data",
                         world["val"], "--scale", "2"], "does not match"),
        (promote_job.main, ["--experiment", "no-such-experiment", "--registered-model", world["model"],
                            "--tracking-uri", world["uri"]], "does not exist"),
        (promote_job.main, ["--registered-model", world["model"], "--version", "99", "--tracking-uri", world["uri"]],
         "version 99"),
        (promote_job.main, ["--experiment", world["experiment"], "--registered-model", world["model"],
                            "--metric", "val/lpips", "--tracking-uri", world["uri"]], "needs LPIPS"),
        (evaluate.main, ["--model", f"models:/{world['model']}@champion", "--data", world["val"],
                         "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda main=main, argv=argv: main(argv))
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_promotion_lock_is_exclusive_and_breaks_stale_locks(world):
    from jobs.cli import JobError
    from jobs.tracking.registry import alias_lock

    client, name = world["client"], world["model"] + "-locktest"
    events = []

    def holder():
        with alias_lock(client, name, "champion"):
            events.append(("a-in", time.time()))
            time.sleep(1.0)
            events.append(("a-out", time.time()))

    thread = threading.Thread(target=holder)
    thread.start()
    while not events:
        time.sleep(0.05)
    with alias_lock(client, name, "champion", wait_s=20):
        events.append(("b-in", time.time()))
    thread.join()
    assert [e for e, _ in events] == ["a-in", "a-out", "b-in"]
    with alias_lock(client, name, "champion"):
        with pytest.raises(JobError, match="holds the lock"):
            with alias_lock(client, name, "champion", wait_s=0.5):
                pass
    # A lock left by a crashed job (older than the TTL) is broken.
    client.create_registered_model(f"{name}--champion--lock", tags={"owner": "crashed", "acquired_at": "0"})
    with alias_lock(client, name, "champion", wait_s=5, ttl_s=60):
        pass
    assert client.search_registered_models(f"name LIKE '{name}%'") == []


def test_help_of_every_job(capsys):
    import importlib

    for module in ("evaluate", "promote", "import_weights", "enhance", "export"):
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(f"jobs.{module}").parse_args(["--help"])
        assert exit_info.value.code == 0 and f"python -m jobs.{module}" in capsys.readouterr().out
    # And once for real, as users type it.
    done = subprocess.run([sys.executable, "-m", "jobs.promote", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0 and "--min-improvement" in done.stdout, done.stderr
