"""evaluate, the promotion gate, export and the end-of-run report for the x1 tasks (denoise, lowlight, fusion).

Tiny generators (8 features, 1 block) written as generator files that record their task; tiny images (32 x 40,
smooth, so that non-local means has something to keep). Nothing is replaced by a stand-in: the jobs run for real
with their own `--no-log` flag (a user's option), because what these tests check is the job logic (metrics,
baselines, the gate's decision, the exported files). The same jobs against a real mlflow server and a real local
Ray cluster (training, registry, promotion, batch enhancement) are tested in tests/jobs/test_task_train.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gan_core.checkpoint import generator_task, save_generator
from gan_core.metrics import psnr
from gan_core.models import build_generator
from gan_core.task_config import TASK_METRIC_KEYS
from jobs.cli import JobError
from jobs.tracking.registry import describe_evaluation, gate_promotion

FUSION_GAIN = ("gain_qabf", "qabf", "average_qabf")  # gan_core.tasks.Fusion.gain


def tiny_generator(num_in_ch: int, num_out_ch: int, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator(scale=1, num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=8, num_block=1,
                           num_grow_ch=4, **options).eval()


def generator_file(path, task: dict | None, num_in_ch: int = 3, num_out_ch: int = 3, **options):
    """A generator file that records `task` (or, with None, none: plain super-resolution as far as it says)."""
    generator = tiny_generator(num_in_ch, num_out_ch, **options)
    return save_generator(path, generator, task=task)


def smooth_image(seed: int, height: int = 32, width: int = 40) -> np.ndarray:
    """uint8 H x W x 3: colour gradients plus a soft blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [rng.uniform(40, 200) + rng.uniform(-60, 60) * xx + rng.uniform(-60, 60) * yy
                + 40 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) * 20) for _ in range(3)]
    return np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8)


def write_clean(folder, count: int = 2) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    images = [smooth_image(index) for index in range(count)]
    for index, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img{index}.png")
    return images


def write_noisy_pairs(root, sigma: float = 25.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """root/noisy and root/clean, same file names; the noisy image is the clean one plus Gaussian noise."""
    clean = write_clean(root / "clean")
    (root / "noisy").mkdir()
    rng = np.random.default_rng(5)
    pairs = []
    for index, img in enumerate(clean):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)
        Image.fromarray(noisy).save(root / "noisy" / f"img{index}.png")
        pairs.append((noisy, img))
    return pairs


def write_fusion_pairs(root, count: int = 2) -> None:
    """root/ir (8-bit gray) and root/vi (RGB)."""
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    for index in range(count):
        visible = smooth_image(10 + index)
        infrared = smooth_image(20 + index)[..., 0]
        Image.fromarray(infrared, mode="L").save(root / "ir" / f"pair{index}.png")
        Image.fromarray(visible).save(root / "vi" / f"pair{index}.png")


def method_rows(printed: str) -> dict[str, list[float]]:
    """The rows of the method table (`--baselines`): method name -> values."""
    lines = printed.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("method"))
    rows = {}
    for line in lines[start + 1:]:
        name, *values = line.split()
        try:
            rows[name] = [float(value) for value in values]
        except ValueError:
            break
    return rows


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a working directory of its own: relative outputs of the jobs land in tmp_path


# -- evaluate --------------------------------------------------------------------------------------------

def test_evaluate_denoise_model_on_clean_images_with_baselines(tmp_path, capsys):
    from jobs.evaluate import main

    model = generator_file(tmp_path / "denoise.pt", {"name": "denoise"})
    write_clean(tmp_path / "clean")
    argv = ["--model", str(model), "--data", str(tmp_path / "clean"), "--no-log", "--device", "cpu", "--baselines"]
    result = main(argv)
    printed = capsys.readouterr().out
    assert result["task"] == "denoise" and result["baseline"] == "input" and result["images"] == 2
    expected = set(TASK_METRIC_KEYS["denoise"]) - {"lpips"}
    assert expected <= set(result["metrics"])
    # The table: the task's metrics against the input; then one row per method.
    assert "task denoise" in printed and "sigma 25" in printed and "PSNR-Y (dB)" in printed
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "model", "input", "gain"]
    rows = method_rows(printed)
    assert list(rows) == ["model", "input", "NLM"]
    input_psnr, nlm_psnr = rows["input"][0], rows["NLM"][0]
    assert input_psnr == pytest.approx(result["metrics"]["input_psnr_y"], abs=1e-4)
    assert nlm_psnr > input_psnr + 2  # NLM at the noise's own sigma cleans smooth images
    assert result["baselines"]["NLM"]["psnr_y"] == pytest.approx(nlm_psnr, abs=1e-4)
    # Synthetic inputs are seeded per image: the same numbers again; more noise with --sigma 50.
    assert main(argv)["metrics"] == result["metrics"]
    noisier = main([*argv, "--sigma", "50", "--json"])
    assert noisier["metrics"]["input_psnr_y"] < result["metrics"]["input_psnr_y"] - 3


def test_evaluate_denoise_model_on_a_noisy_clean_folder(tmp_path, capsys):
    from jobs.evaluate import main

    model = generator_file(tmp_path / "denoise.pt", {"name": "denoise"})
    pairs = write_noisy_pairs(tmp_path / "pairs")
    result = main(["--model", str(model), "--data", str(tmp_path / "pairs"), "--no-log", "--device", "cpu",
                   "--baselines"])
    printed = capsys.readouterr().out
    assert "inputs from the paired folder" in printed
    # The noisy files are the inputs, as they are.
    direct = np.mean([psnr(noisy, clean, y_channel=True) for noisy, clean in pairs])
    assert result["metrics"]["input_psnr_y"] == pytest.approx(direct, abs=1e-6)
    rows = method_rows(printed)
    assert list(rows) == ["model", "input", "NLM"]  # NLM with the noise level estimated from each image
    assert rows["NLM"][0] > rows["input"][0]


def test_evaluate_lowlight_gray_model_lists_gamma_and_clahe(tmp_path, capsys):
    from jobs.evaluate import main

    model = generator_file(tmp_path / "lowlight.pt", {"name": "lowlight", "gray": True}, 1, 1)
    write_clean(tmp_path / "clean")
    result = main(["--model", str(model), "--data", str(tmp_path / "clean"), "--no-log", "--device", "cpu",
                   "--baselines", "--json"])
    assert result["task"] == "lowlight" and set(result["baselines"]) == {"gamma", "CLAHE"}
    assert "lpips" not in result["metrics"] and result["notes"] == []  # LPIPS is for RGB outputs
    for means in result["baselines"].values():  # both brighten a darkened image
        assert means["psnr_y"] > means["input_psnr_y"]


def test_evaluate_fusion_model_on_ir_vi_pairs(tmp_path, capsys):
    from jobs.evaluate import main

    model = generator_file(tmp_path / "fusion.pt", {"name": "fusion"}, 2, 1)
    write_fusion_pairs(tmp_path / "fusion")
    result = main(["--model", str(model), "--data", str(tmp_path / "fusion"), "--no-log", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert set(TASK_METRIC_KEYS["fusion"]) <= set(result["metrics"])
    assert "Qabf" in printed and "average" in printed.splitlines()[1]
    # Clean images are no fusion data.
    write_clean(tmp_path / "clean")
    with pytest.raises(JobError, match="ir"):
        main(["--model", str(model), "--data", str(tmp_path / "clean"), "--no-log", "--device", "cpu"])


def test_evaluate_task_comes_from_the_file_and_task_names_it_for_plain_files(tmp_path, capsys):
    from jobs.evaluate import main

    write_clean(tmp_path / "clean")
    recorded = generator_file(tmp_path / "denoise.pt", {"name": "denoise"})
    with pytest.raises(JobError, match="trained for task denoise"):
        main(["--model", str(recorded), "--data", str(tmp_path / "clean"), "--no-log", "--task", "lowlight"])
    # A x1 RGB file that says nothing is sr by default, but --task may name it.
    plain = generator_file(tmp_path / "plain.pt", None)
    assert generator_task(plain).name == "sr"
    result = main(["--model", str(plain), "--data", str(tmp_path / "clean"), "--no-log", "--device", "cpu",
                   "--task", "denoise", "--json"])
    assert result["task"] == "denoise" and "input_psnr_y" in result["metrics"]
    # A fusion generator (2 -> 1) cannot be scored as sr.
    two = tiny_generator(2, 1)
    save_generator(tmp_path / "two.pt", two)
    with pytest.raises(JobError, match="2 -> 1 channels.*--task"):
        main(["--model", str(tmp_path / "two.pt"), "--data", str(tmp_path / "clean"), "--no-log"])


# -- the promotion gate ------------------------------------------------------------------------------------

FUSION = {"en": 6.6, "average_en": 6.5, "mi": 3.2, "average_mi": 3.0, "qabf": 0.50, "average_qabf": 0.45,
          "gain_qabf": 0.05, "images": 3.0, "nonfinite_images": 0.0}


@pytest.mark.parametrize(("candidate", "holder", "options", "failed"), [
    (FUSION, None, {"min_gain": 0.01}, ()),
    (FUSION, None, {"min_gain": 0.05}, ("gain",)),  # equal to the required gain is not above it
    ({**FUSION, "qabf": 0.44, "gain_qabf": -0.01}, None, {}, ("gain",)),
    ({**FUSION, "gain_qabf": math.nan}, None, {}, ("finite", "gain")),
    (FUSION, {**FUSION, "qabf": 0.52, "gain_qabf": 0.07}, {}, ("margin",)),
    ({**FUSION, "qabf": 0.53, "gain_qabf": 0.08}, FUSION, {"min_improvement": 0.02}, ()),
])
def test_gate_on_fusion_uses_qabf_over_the_average(candidate, holder, options, failed):
    decision = gate_promotion(candidate, holder, "2" if holder else None, alias="champion", metric="val/qabf",
                              gain=FUSION_GAIN, **options)
    assert decision.failed == failed and decision.promote is (not failed)
    if "gain" in failed:
        assert "does not beat average: Qabf" in decision.reason and " dB" not in decision.reason
    if not failed and holder is None:
        assert "Qabf gain over average" in decision.reason
    tags = decision.tags("champion")
    assert "promotion.gain_qabf" in tags and "promotion.gain_psnr_y" not in tags
    assert tags["promotion.min_gain"] == str(options.get("min_gain", 0.0))


def test_gate_on_denoise_uses_psnr_over_the_input():
    candidate = {"psnr_y": 30.0, "input_psnr_y": 30.0, "gain_psnr_y": 0.0, "ssim_y": 0.9, "input_ssim_y": 0.8,
                 "images": 2.0, "nonfinite_images": 0.0}
    gain = ("gain_psnr_y", "psnr_y", "input_psnr_y")
    refused = gate_promotion(candidate, None, None, alias="champion", gain=gain)
    assert refused.failed == ("gain",) and "does not beat input: PSNR-Y 30.0000 vs 30.0000" in refused.reason
    passed = gate_promotion({**candidate, "psnr_y": 31.0, "gain_psnr_y": 1.0}, None, None, alias="champion",
                            gain=gain)
    assert passed.promote and "dB" in passed.reason


def test_version_description_names_the_task_baseline():
    text = describe_evaluation(FUSION, "data/demo/fusion/val", "abc", FUSION_GAIN)
    assert "Qabf 0.5000 (average 0.4500)" in text and "from run abc" in text
    sr = {"psnr_y": 28.0, "bicubic_psnr_y": 27.0, "ssim_y": 0.7, "bicubic_ssim_y": 0.69, "images": 3}
    assert describe_evaluation(sr, "val", None) == ("held-out val (3 images): PSNR-Y 28.000 dB (bicubic 27.000), "
                                                    "SSIM-Y 0.7000 (bicubic 0.6900)")


# -- export -------------------------------------------------------------------------------------------------

def test_export_fusion_generator_to_onnx_and_int8(tmp_path, capsys):
    """The task recipes' generator (full-resolution trunk, nearest skip): exact in ONNX, gan_core-only files."""
    pytest.importorskip("onnxruntime")
    from jobs.export import main

    model = generator_file(tmp_path / "fusion.pt", {"name": "fusion"}, 2, 1, pixel_unshuffle=False,
                           upsample_skip="nearest")
    write_fusion_pairs(tmp_path / "fusion")
    result = main(["--model", str(model), "--data", str(tmp_path / "fusion"), "--output", str(tmp_path / "out"),
                   "--onnx-fp16"])
    printed = capsys.readouterr().out
    assert result["task"] == "fusion"
    assert result["portable"]["pth"] is None and any("pixel_unshuffle" in p for p in result["portable"]["problems"])
    assert result["onnx"]["max_abs_diff"] < 1e-4 and (tmp_path / "out" / "generator.onnx").is_file()
    assert result["onnx_fp16"]["max_abs_diff"] < 1e-2 and (tmp_path / "out" / "generator_fp16.onnx").is_file()
    assert "ONNX float16" in printed
    int8 = result["int8"]
    assert int8["metric"] == "qabf" and {"qabf_fp32", "qabf_int8", "qabf_change", "average_qabf"} <= set(int8)
    assert "Qabf" in printed and "task fusion" in printed
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "generator.onnx"),
                                           providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.shape[1] == 2  # infrared and visible luma


# -- the end-of-run report ----------------------------------------------------------------------------------

def test_summary_prints_the_task_metric_against_its_baseline(capsys):
    from gan_core.config import config_from_dict
    from jobs.training import report

    class Checkpoint:
        path = "/runs/fusion/checkpoint_000001"

    class Result:
        checkpoint = Checkpoint()

    cfg = config_from_dict({"task": {"name": "fusion"}, "generator": {"scale": 1, "num_in_ch": 2, "num_out_ch": 1},
                            "loss": {"perceptual": "none"}, "run": {"checkpoint_metric": "val/qabf"}})
    metrics = {f"val/{key}": value for key, value in FUSION.items()}
    report.print_summary(cfg, Result(), metrics, "sqlite:///mlflow.db")
    printed = capsys.readouterr().out
    qabf = next(line for line in printed.splitlines() if line.strip().startswith("Qabf"))
    assert "model 0.5000" in qabf and "average 0.4500" in qabf and "gain +0.0500" in qabf
    assert "PSNR" not in printed and "bicubic" not in printed
    card = report.model_card(cfg, metrics, ["generator.pt"])
    assert "task fusion (2 -> 1 channels)" in card and "Qabf 0.5000 vs average 0.4500 (+0.0500)" in card
    sr = config_from_dict({})
    report.print_summary(sr, Result(), {"val/psnr_y": 28.1, "val/bicubic_psnr_y": 27.0, "val/ssim_y": 0.8,
                                        "val/bicubic_ssim_y": 0.7}, "sqlite:///mlflow.db")
    printed = capsys.readouterr().out
    assert "PSNR  model 28.100 dB" in printed and "bicubic 27.000 dB" in printed and "gain +1.100 dB" in printed
