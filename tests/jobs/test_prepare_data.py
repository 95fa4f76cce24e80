"""jobs.prepare_data as a user runs it: shards from a folder, bad files listed, bad arguments refused,
existing shards never lost to a source that yields nothing; the denoise / lowlight / fusion pairs and demos."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gan_core.data import PAIR_LAYOUTS, load_shard_images, prepare_demo_folders, read_shards, shard_files, write_shards
from gan_core.data import demo as demo_module
from jobs.cli import run_main
from jobs.prepare_data import main
from tests.jobs.conftest import REPO


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jobs.prepare_data", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_folder_to_shards_lists_skipped_files(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)).save(src / "good.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(src / "tiny.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    done = _cli("--src", str(src), "--out", str(tmp_path / "shards"), "--crop-size", "64", "--step", "32",
                "--min-size", "32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped broken.jpg" in done.stdout and "skipped tiny.png" in done.stdout
    rows = list(read_shards(tmp_path / "shards"))
    # BasicSR's extract_subimages on 100x140 with crop 64, step 32: rows at 0, 32, 36; columns at 0, 32, 64, 76.
    assert len(rows) == 3 * 4 and {r["source"] for r in rows} == {"good.png"}


def test_missing_source_is_a_clear_error(tmp_path):
    done = _cli("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "shards"), cwd=tmp_path)
    assert done.returncode == 2
    assert "is not a folder" in done.stderr


def test_no_arguments_explains_usage(tmp_path):
    done = _cli(cwd=tmp_path)
    assert done.returncode == 2 and "give --demo, or both --src and --out" in done.stderr


def _tree(folder):
    """Every file under folder, hidden ones included, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_source_without_usable_images_keeps_existing_shards(tmp_path):
    # The probe: cp -r data/demo/train_shards shards_copy; mkdir empty; prepare_data --src empty --out shards_copy
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)).save(src / "good.png")
    shards = tmp_path / "shards_copy"
    write_shards(src, shards, crop_size=32, rows_per_shard=5)
    before = _tree(shards)
    assert len(before) > 3
    (tmp_path / "empty").mkdir()
    # (A folder of only unusable files takes the same path: tests/gan_core/test_data.py.)
    for source, message in (("empty", "no usable image in empty: no image files"),
                            ("typo", "--src typo is not a folder")):
        done = _cli("--src", source, "--out", "shards_copy", "--crop-size", "32", cwd=tmp_path)
        assert done.returncode == 2, (source, done.stderr)
        assert _tree(shards) == before, source  # byte-identical, nothing added or removed
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (source, done.stderr)
        assert "Traceback" not in done.stderr


def test_tiny_images_and_symlink_loops_are_skipped_and_named(tmp_path):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(src / "good.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).save(src / "dot.png")
    os.symlink("..", src / "sub" / "up")
    os.symlink("self.png", src / "self.png")
    done = _cli("--src", str(src), "--out", str(tmp_path / "shards"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped dot.png: 1x1 px: shorter side below the minimum of 16 px" in done.stdout
    assert "skipped self.png: symlink loop" in done.stdout and "skipped sub/up: symlink loop" in done.stdout
    assert "skipped 3" in done.stdout
    assert [r["source"] for r in read_shards(tmp_path / "shards", columns=["source"])] == ["good.png"]


# ---------------------------------------------------------------- tasks: denoise, lowlight, fusion


@pytest.fixture(scope="module")
def few_photos():
    """Two training photos (the smallest) and the three validation photos: the demo tests stay fast."""
    photos = demo_module.demo_images()
    return {"train": [p for p in photos["train"] if p.name in ("ihc.png", "motorcycle_left.png")], "val": photos["val"]}


@pytest.fixture
def demo_base(tmp_path_factory, few_photos, monkeypatch):
    """A working directory whose data/demo holds a few demo photos, shared by the --task demo tests."""
    monkeypatch.setattr(demo_module, "demo_images", lambda: few_photos)
    base = tmp_path_factory.getbasetemp() / "demo_base"
    prepare_demo_folders(base / "data" / "demo")
    return base


def test_fusion_demo_command_as_pasted(demo_base, monkeypatch, capsys):
    # `python -m jobs.prepare_data --demo --task fusion`, in-process (the subprocess tests above cover `-m`).
    monkeypatch.chdir(demo_base)
    main(["--demo", "--task", "fusion"])
    out = capsys.readouterr().out
    root = demo_base / "data" / "demo"
    assert re.search(r"fusion demo pairs \(synthetic\): train data/demo/fusion/train \(2 pairs\), "
                     r"validation data/demo/fusion/val \(3 pairs\)", out), out
    assert "shards: data/demo/fusion/train_shards" in out and "skipped" not in out
    for part in ("train", "val"):  # the same photos, the same split as the SR demo
        photos = sorted(p.name for p in (root / part).glob("*.png"))
        assert sorted(p.name for p in (root / "fusion" / part / "ir").iterdir()) == photos
        assert sorted(p.name for p in (root / "fusion" / part / "vi").iterdir()) == photos
    assert sorted((root / "fusion" / "val" / "vi").iterdir())[0].name == "astronaut.png"
    assert Image.open(root / "fusion" / "val" / "ir" / "astronaut.png").mode == "L"  # gray, as real IR sets
    [(name, example)] = load_shard_images(shard_files(root / "fusion" / "train_shards")[0])[:1]
    assert example.shape == (192, 192, 6) and (example[..., :3] == example[..., :1]).all()


@pytest.mark.parametrize("task", ["denoise", "lowlight"])
def test_denoise_and_lowlight_demo_pairs(demo_base, task, capsys):
    root = demo_base / "data" / "demo"
    main(["--demo", "--task", task, "--root", str(root), "--crop-size", "256", "--step", "256"])
    input_name, target_name = PAIR_LAYOUTS[task]
    assert f"{task} demo pairs (synthetic): train {root / task / 'train'}" in capsys.readouterr().out
    for name in ("coffee.png", "chelsea.png"):
        photo = np.asarray(Image.open(root / "val" / name))
        np.testing.assert_array_equal(np.asarray(Image.open(root / task / "val" / target_name / name)), photo)
        degraded = np.asarray(Image.open(root / task / "val" / input_name / name))
        assert degraded.shape == photo.shape and not np.array_equal(degraded, photo)
    examples = load_shard_images(root / task / "train_shards")
    assert examples and all(example.shape == (256, 256, 6) for _, example in examples)


def test_lol_layout_with_a_mismatched_name(tmp_path, monkeypatch, capsys):
    lol = tmp_path / "LOL" / "our485"
    for folder in ("low", "high"):
        (lol / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("low/1.png", "high/1.png", "low/2.png", "high/02.png"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(lol / name)
    monkeypatch.chdir(tmp_path)
    main(["--task", "lowlight", "--src", "LOL/our485", "--out", "lol_shards", "--crop-size", "32"])
    out = capsys.readouterr().out
    assert "lowlight pairs: inputs from LOL/our485/low, targets from LOL/our485/high" in out
    assert "skipped high/02.png: no partner in low/" in out
    assert "skipped low/2.png: no partner in high/" in out and "skipped 2" in out
    rows = list(read_shards(tmp_path / "lol_shards"))
    assert {row["source"] for row in rows} == {"1.png"} and all(row["input"] for row in rows)


def test_denoise_from_a_plain_folder_writes_plain_shards(tmp_path, capsys):
    src = tmp_path / "DIV2K_train_HR"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(src / "0001.png")
    main(["--task", "denoise", "--src", str(src), "--out", str(tmp_path / "shards")])
    assert "has no noisy/ and clean/ sub-folders: writing plain shards" in capsys.readouterr().out
    assert [row["input"] for row in read_shards(tmp_path / "shards")] == [None]


@pytest.mark.parametrize(("task", "folders", "message"), [
    ("fusion", [], "expected {src}/ir and {src}/vi with the same file names (TNO / RoadScene / LLVIP / M3FD"),
    ("denoise", ["noisy"], "expected {src}/noisy and {src}/clean with the same file names"),
])
def test_incomplete_pair_layout_is_one_error_line(tmp_path, capsys, task, folders, message):
    src = tmp_path / "pairs"
    for folder in folders:
        (src / folder).mkdir(parents=True)
    src.mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: main(["--task", task, "--src", str(src), "--out", str(tmp_path / "shards")]))
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(src=src) in errors[0], errors
    assert not (tmp_path / "shards").exists()
