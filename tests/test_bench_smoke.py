"""The data benchmarks run end to end (`--quick`): rows for every stage, numbers that are numbers."""

from __future__ import annotations

import math

import pytest

from bench import data_memory, data_throughput


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
