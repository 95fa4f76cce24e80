"""jobs.prepare_data as a user runs it: shards from a folder, bad files listed, bad arguments refused,
existing shards never lost to a source that yields nothing."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from gan_core.data import read_shards, write_shards
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
