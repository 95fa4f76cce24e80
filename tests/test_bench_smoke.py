"""The data benchmarks run end to end (`--quick`): rows for every stage, numbers that are numbers."""

from __future__ import annotations

import math

import pytest

from bench import data_memory, data_throughput, gpu_step


def test_data_throughput_quick_has_every_row(capsys):
    rows = data_throughput.main(["--quick"])
    stages = {stage for stage, device, _, _ in rows if device == "cpu"}
    assert {"decode + crop", "decode + crop + bicubic LR", "first order (batch)", "second order (batch)",
            "train step, pixel", "train step, GAN"} <= stages
    assert all(value is None or (math.isfinite(value) and value > 0) for _, _, value, _ in rows)
    out = capsys.readouterr().out
    assert "| stage | device |" in out and "CPU cores of data work" in out


@pytest.mark.slow
def test_data_memory_quick_measures_both_loaders():
    # One tile count: a local Ray cluster and two 2-worker TorchTrainer runs (about a minute on 2 cores).
    table = data_memory.main(["--quick", "--tiles", "40"])
    assert [row["loader"] for row in table] == ["memory", "stream"]
    memory, stream = table
    assert memory["images_held"] == 40 and stream["images_held"] == 0  # the stream's workers hold no image
    for row in table:
        assert row["data"] > 0 and row["train"] > 0 and row["rss_peak_mb"] >= row["rss_start_mb"] > 0


def test_gpu_step_tiny_runs_basicsr_and_ours_on_the_same_maths():
    # The smoke run of the GPU benchmark on the CPU: BasicSR 1.4.2's ESRGAN step (from its sdist) and ours, same
    # tiny networks and batches. Not a timing test: it checks that every row is measured and that the two steps
    # compute the same losses on their first step.
    result = gpu_step.main(["--tiny", "--repeats", "1"])
    paths = {(row["kind"], row["path"]) for row in result["rows"]}
    assert {("train", "BasicSR 1.4.2 fp32"), ("train", "ours fp32 eager"), ("train", "ours bf16 + channels_last, eager"),
            ("inference", "BasicSR 1.4.2 fp32"), ("inference", "ours fp32 eager")} <= paths
    assert all(math.isfinite(row["img_s"]) and row["img_s"] > 0 for row in result["rows"])
    train = [row for row in result["rows"] if row["kind"] == "train"]
    assert all(row["tflops"] > 0 for row in train)
    first = result["numerics"]["first_step_rel_diff_vs_basicsr"]
    assert set(first) == {"l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake"}
    assert max(first.values()) < 1e-5, first
    assert max(result["numerics"]["bf16_vs_fp32_mean_rel_diff"].values()) < 0.05
