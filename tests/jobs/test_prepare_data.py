"""jobs.prepare_data as a user runs it: shards from a folder, bad files listed, bad arguments refused."""

import subprocess
import sys

import numpy as np
from PIL import Image

from gan_core.data import read_shards
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
