"""Tests of gan_core.data: shards, imresize, degradations, demo set (patches: test_pairs.py; image files: test_image_files.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gan_core.data import (
    DEMO_VAL,
    add_gaussian_noise,
    add_poisson_noise,
    bicubic_downscale,
    bicubic_upscale,
    decode_image,
    degrade,
    demo_images,
    gaussian_blur,
    imresize,
    jpeg_compress,
    load_image,
    load_shard_images,
    prepare_demo_folders,
    read_shards,
    shard_files,
    write_shards,
)
from gan_core.data.demo import package_file
from gan_core.data.shards import MIN_IMAGE_SIDE, NoUsableImagesError, find_image_files, scan_image_folder
from tests.gan_core.conftest import png16, random_rgb

torch.set_num_threads(1)


# ---------------------------------------------------------------- shards


def _basicsr_tile_count(height, width, crop, step, thresh):
    """BasicSR's extract_subimages.py arithmetic, written independently."""

    def starts(length):
        space = np.arange(0, length - crop + 1, step)
        if length - (space[-1] + crop) > thresh:
            space = np.append(space, length - crop)
        return len(space)

    return starts(height) * starts(width)


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    Image.fromarray(random_rgb(70, 100, seed=1)).save(src / "good.png")
    Image.fromarray(random_rgb(45, 50, seed=2)).save(src / "nested" / "photo.JPG", quality=90)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(random_rgb(10, 10, seed=3)).save(src / "tiny.png")
    (src / "deep16.png").write_bytes(png16(np.full((40, 36, 3), 30583, np.uint16), 2))
    (src / "notes.txt").write_text("not an image")
    return src


def test_write_shards_round_trip_with_skips(tmp_path, image_folder):
    calls = []
    out = tmp_path / "shards"
    report = write_shards(image_folder, out, crop_size=32, step=16, thresh_size=0, min_size=16,
                          rows_per_shard=7, progress=lambda done, total: calls.append((done, total)))
    assert report.files_read == 5
    assert calls[-1] == (5, 5) and len(calls) == 5
    assert sorted(name for name, _ in report.skipped) == ["corrupt.png", "tiny.png"]
    assert dict(report.skipped)["tiny.png"] == "10x10 px: shorter side below crop_size 32"
    expected = sum(_basicsr_tile_count(h, w, 32, 16, 0) for h, w in [(70, 100), (45, 50), (40, 36)])
    assert report.rows_written == expected
    assert [p.name for p in report.shard_paths] == [f"part-{i:05d}.parquet" for i in range(-(-expected // 7))]
    assert shard_files(out) == report.shard_paths
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in report.shard_paths]  # no temp files
    assert "skipped 2" in report.summary() and "corrupt.png" in report.summary()

    rows = list(read_shards(out, columns=["source", "tile", "height", "width"]))
    assert len(rows) == expected == pq.read_table(out).num_rows  # a plain parquet folder
    assert {row["source"] for row in rows} == {"good.png", "nested/photo.JPG", "deep16.png"}
    assert all(row["height"] == row["width"] == 32 for row in rows)
    images = dict(load_shard_images(out))
    source = np.asarray(Image.open(image_folder / "good.png"))
    np.testing.assert_array_equal(images["good.png@38_68"], source[38:70, 68:100])  # flush-with-end tiles
    assert images["deep16.png@0_0"][0, 0, 0] == 119  # round(30583 / 257)


def test_write_shards_whole_images_small_tiles_and_stale_shards(tmp_path, image_folder):
    out = tmp_path / "shards"
    write_shards(image_folder, out, crop_size=32, step=16, rows_per_shard=2)
    assert len(shard_files(out)) > 2
    report = write_shards(image_folder, out, rows_per_shard=100)
    assert len(shard_files(out)) == 1  # the earlier run's extra shards are gone
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]  # and no staging folder is left
    rows = list(read_shards(out, columns=["source", "tile", "height", "width"]))
    assert [(r["source"], r["tile"], r["height"], r["width"]) for r in rows] == [
        ("deep16.png", "", 40, 36),
        ("good.png", "", 70, 100),
        ("nested/photo.JPG", "", 45, 50),
    ]
    assert dict(report.skipped)["tiny.png"] == f"10x10 px: shorter side below the minimum of {MIN_IMAGE_SIDE} px"
    assert sorted(dict(report.skipped)) == ["corrupt.png", "tiny.png"]
    # Cropping, an image whose shorter side is below crop_size is skipped: every row is a full crop.
    report = write_shards(image_folder, out, crop_size=64, step=64)
    rows = list(read_shards(out, columns=["source", "tile", "height", "width"]))
    assert {r["source"] for r in rows} == {"good.png"} and all(r["height"] == r["width"] == 64 for r in rows)
    assert sorted(dict(report.skipped)) == ["corrupt.png", "deep16.png", "nested/photo.JPG", "tiny.png"]
    assert dict(report.skipped)["nested/photo.JPG"] == "50x45 px: shorter side below crop_size 64"


def test_write_shards_skips_tiny_images_and_min_size_only_raises_the_floor(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, (height, width) in {"dot.png": (1, 1), "strip.png": (15, 400), "small.png": (16, 16),
                                  "big.png": (40, 60)}.items():
        Image.fromarray(random_rgb(height, width)).save(src / name)
    report = write_shards(src, tmp_path / "whole")
    assert sorted(r["source"] for r in read_shards(tmp_path / "whole", columns=["source"])) == ["big.png", "small.png"]
    assert dict(report.skipped) == {"dot.png": "1x1 px: shorter side below the minimum of 16 px",
                                    "strip.png": "400x15 px: shorter side below the minimum of 16 px"}
    assert "skipped 2" in report.summary() and "dot.png" in report.summary()
    # min_size above the floor raises it; below it changes nothing (the 1x1 image is still skipped).
    report = write_shards(src, tmp_path / "raised", min_size=20)
    assert dict(report.skipped)["small.png"] == "16x16 px: shorter side below min_size 20"
    report = write_shards(src, tmp_path / "lowered", min_size=1)
    assert sorted(dict(report.skipped)) == ["dot.png", "strip.png"]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) with its contents."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_shards(tmp_path, image_folder):
    out = tmp_path / "shards"
    write_shards(image_folder, out, crop_size=32, step=16, rows_per_shard=4)
    before = _folder_bytes(out)
    assert len(before) > 3
    return out, before


@pytest.mark.parametrize("contents", ["empty", "only_bad_files"])
def test_write_shards_without_usable_images_leaves_existing_shards_alone(tmp_path, existing_shards, contents):
    out, before = existing_shards
    src = tmp_path / contents
    src.mkdir()
    if contents == "only_bad_files":
        (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        Image.fromarray(random_rgb(1, 1)).save(src / "dot.png")
    with pytest.raises(NoUsableImagesError, match=f"no usable image in {src}.*nothing written") as caught:
        write_shards(src, out, crop_size=32)
    assert _folder_bytes(out) == before  # byte-identical, nothing added, nothing removed
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder left either
    assert caught.value.report.rows_written == 0
    if contents == "only_bad_files":
        assert sorted(dict(caught.value.report.skipped)) == ["corrupt.png", "dot.png"]
    # A new output folder is not left behind either.
    with pytest.raises(NoUsableImagesError):
        write_shards(src, tmp_path / "new" / "shards")
    assert not (tmp_path / "new" / "shards").exists()


def test_write_shards_crash_midway_leaves_existing_shards_alone(tmp_path, existing_shards, image_folder, monkeypatch):
    out, before = existing_shards
    import gan_core.data.shards as shards_module

    decoded = []

    def decode_then_crash(data, name="<bytes>", **kwargs):
        if len(decoded) == 3:
            raise MemoryError("simulated crash after three images")
        decoded.append(name)
        return decode_image(data, name=name, **kwargs)

    monkeypatch.setattr(shards_module, "decode_image", decode_then_crash)
    with pytest.raises(MemoryError, match="simulated"):
        write_shards(image_folder, out, crop_size=16, step=8, rows_per_shard=2)  # shards were staged before it
    assert _folder_bytes(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


# ---------------------------------------------------------------- folder walking


@pytest.fixture
def tangled_folder(tmp_path):
    """Images beside every kind of link a real folder collects, made for real with os.symlink."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".cache").mkdir()
    for path in (src / "a.png", src / "sub" / "b.png", src / ".cache" / "hidden.png", src / "sub" / ".c.png"):
        Image.fromarray(random_rgb(20, 20)).save(path)
    os.symlink("..", src / "sub" / "up")  # a folder loop: sub/up/sub/up/...
    os.symlink("loop.png", src / "loop.png")  # a link to itself: ELOOP
    os.symlink("ping", src / "pong")  # two links to each other
    os.symlink("pong", src / "ping")
    os.symlink("gone.jpg", src / "broken.jpg")
    os.symlink("sub", src / "alias")  # a second way into sub: walked once, under its real name
    os.symlink(src / "a.png", src / "sub" / "a_link.png")  # a link to a file is an image like any other
    return src


def test_scan_image_folder_reports_symlink_loops_and_broken_links(tangled_folder):
    scan = scan_image_folder(tangled_folder)
    assert [p.relative_to(tangled_folder).as_posix() for p in scan.files] == ["a.png", "sub/a_link.png", "sub/b.png"]
    # Unreadable: nothing behind them could be read. Not followed: their folder was walked anyway.
    assert dict(scan.unreadable) == {
        "broken.jpg": "broken symlink: gone.jpg does not exist",
        "loop.png": "symlink loop: following the link leads back to it",
        "ping": "symlink loop: following the link leads back to it",
        "pong": "symlink loop: following the link leads back to it",
    }
    assert dict(scan.not_followed) == {
        "alias": "same folder as sub, already scanned, not followed",
        "sub/up": "symlink loop: leads back to ., not followed",
    }
    problems = dict(scan.problems)
    assert len(problems) == 6
    # Other callers get the same list as warnings, and the same files.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_image_files(tangled_folder) == scan.files
    assert sorted(str(w.message).split(": skipped ")[1].split(":")[0] for w in caught) == sorted(problems)


def test_write_shards_counts_and_names_unfollowable_links(tmp_path, tangled_folder):
    report = write_shards(tangled_folder, tmp_path / "shards")
    assert report.files_read == 3 and report.rows_written == 3
    assert {name for name, _ in report.skipped} == {"broken.jpg", "loop.png", "ping", "pong", "alias", "sub/up"}
    assert "skipped 6" in report.summary()
    sources = sorted(r["source"] for r in read_shards(tmp_path / "shards", columns=["source"]))
    assert sources == ["a.png", "sub/a_link.png", "sub/b.png"]  # hidden files and folders stay out


# ---------------------------------------------------------------- imresize

# Recorded with BasicSR 1.4.2's basicsr/utils/matlab_functions.py imresize on
# _pattern(shape): (shape, scale, antialiasing, output shape, flattened output).
IMRESIZE_GOLDEN = [
    ((2, 9, 7), 0.25, True, (2, 3, 2), [0.4545028, 0.5191483, 0.5480595, 0.4604466, 0.5685065, 0.5047939, 0.4447625,
                                        0.5273042, 0.4935914, 0.4921993, 0.5048672, 0.5071887]),
    ((1, 9, 10), 1 / 3, True, (1, 3, 4), [0.3806371, 0.464891, 0.5715227, 0.6233746, 0.4919204, 0.4424006, 0.5611934,
                                          0.6130453, 0.4369487, 0.4365356, 0.5508642, 0.602716]),
    ((1, 3, 4), 2, True, (1, 6, 8), [
        -0.07875, 0.02020263, 0.2181079, 0.463562, 0.7565649, 0.6740648, 0.216062, -0.01293944, 0.04754639, 0.161109,
        0.3882342, 0.5441174, 0.6287585, 0.5457038, 0.294953, 0.1695776, 0.3001392, 0.4429218, 0.728487, 0.7052284,
        0.3731458, 0.2889814, 0.452735, 0.5346118, 0.5830615, 0.6438556, 0.7654437, 0.6666692, 0.3475324, 0.2698407,
        0.4335943, 0.5154712, 0.8963134, 0.7639105, 0.4991046, 0.4284406, 0.5519183, 0.4882819, 0.2375311, 0.1121558,
        1.052939, 0.8239379, 0.3659351, 0.3093262, 0.6541113, 0.5975025, 0.1394995, -0.08950196]),
    ((1, 2, 3), 4, True, (1, 8, 12), [
        -0.05507813, -0.03195313, 0.01682617, 0.09993164, 0.2032715, 0.3095019, 0.4070606, 0.5132911, 0.6166309,
        0.6997363, 0.7485156, 0.7716406, -0.04882812, -0.02570312, 0.02307617, 0.1061816, 0.2095215, 0.3157519,
        0.4133105, 0.519541, 0.6228809, 0.7059864, 0.7547656, 0.7778907, -0.03496093, -0.01183594, 0.03694336,
        0.1200488, 0.2233887, 0.3296191, 0.4271777, 0.5334082, 0.636748, 0.7198535, 0.7686328, 0.7917578,
        -0.008789059, 0.01433594, 0.06311523, 0.1462207, 0.2495605, 0.355791, 0.4533496, 0.5595801, 0.6629199,
        0.7460254, 0.7948046, 0.8179296, 0.02207031, 0.04519532, 0.09397461, 0.1770801, 0.2804199, 0.3866504,
        0.484209, 0.5904395, 0.6937793, 0.7768847, 0.825664, 0.848789, 0.04824219, 0.07136719, 0.1201465, 0.2032519,
        0.3065918, 0.4128223, 0.5103809, 0.6166113, 0.7199512, 0.8030566, 0.8518359, 0.8749609, 0.06210939,
        0.08523439, 0.1340137, 0.2171191, 0.320459, 0.4266894, 0.524248, 0.6304785, 0.7338184, 0.8169237, 0.865703,
        0.888828, 0.06835938, 0.09148438, 0.1402637, 0.2233691, 0.326709, 0.4329394, 0.530498, 0.6367285, 0.7400683,
        0.8231738, 0.8719531, 0.8950781]),
    ((1, 8, 6), 0.5, False, (1, 4, 3), [0.2454297, 0.5430078, 0.513125, 0.7644531, 0.3439844, 0.3890625, 0.5529297,
                                        0.5980079, 0.568125, 0.464375, 0.4384375, 0.4440625]),
]


def _pattern(shape):
    return ((torch.arange(int(np.prod(shape))) * 37) % 101).float().reshape(shape) / 100


@pytest.mark.parametrize("shape, scale, antialiasing, out_shape, expected", IMRESIZE_GOLDEN)
def test_imresize_matches_basicsr(shape, scale, antialiasing, out_shape, expected):
    out = imresize(_pattern(shape), scale, antialiasing=antialiasing)
    assert tuple(out.shape) == out_shape
    np.testing.assert_allclose(out.flatten().numpy(), expected, atol=1e-5)


def test_imresize_batch_equals_single_and_large_inputs():
    batch = torch.rand(3, 3, 300, 260, generator=torch.Generator().manual_seed(0))  # > 256: the gather path
    out = imresize(batch, 0.25)
    assert out.shape == (3, 3, 75, 65)
    for i in range(3):
        torch.testing.assert_close(imresize(batch[i], 0.25), out[i], atol=1e-6, rtol=0)
    # Gather path and dense path agree (the same image, cropped to <= 256 rows).
    torch.testing.assert_close(imresize(batch[0, :, :256, :256], 0.25),
                               imresize(batch[0, :, :256, :256].contiguous(), 0.25))
    with pytest.raises(ValueError, match="float"):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), 0.5)


def test_bicubic_downscale_and_upscale_stay_in_range():
    edge = torch.zeros(3, 32, 32)
    edge[:, :, 16:] = 1.0  # bicubic rings around a step edge
    small = bicubic_downscale(edge, 4)
    assert small.shape == (3, 8, 8) and small.min() >= 0 and small.max() <= 1
    assert imresize(edge, 0.25).min() < 0 and imresize(small, 4).max() > 1  # the clamps are needed
    large = bicubic_upscale(small, 4)
    assert large.shape == (3, 32, 32) and large.min() >= 0 and large.max() <= 1


# ---------------------------------------------------------------- degradations

DEGRADATION_CASES = {
    "none": {},
    "blur": {"blur_sigma": (0.5, 2.0)},
    "noise": {"noise_sigma": (1.0, 25.0)},
    "poisson": {"poisson_scale": (0.5, 2.0)},
    "jpeg": {"jpeg_quality": (30, 90)},
    "all": {"blur_sigma": (0.2, 3.0), "noise_sigma": (5, 5), "poisson_scale": (0.1, 1.0), "jpeg_quality": (50, 50)},
}


@pytest.mark.parametrize("case", DEGRADATION_CASES)
def test_degrade_shapes_ranges_and_determinism(case):
    gt = torch.rand(4, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    kwargs = DEGRADATION_CASES[case]
    lq = degrade(gt, 4, generator=torch.Generator().manual_seed(5), **kwargs)
    assert lq.shape == (4, 3, 8, 6) and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    again = degrade(gt, 4, generator=torch.Generator().manual_seed(5), **kwargs)
    torch.testing.assert_close(lq, again, atol=0, rtol=0)
    single = degrade(gt[0], 4, generator=torch.Generator().manual_seed(5), **kwargs)
    assert single.shape == (3, 8, 6)
    plain = bicubic_downscale(gt, 4)
    assert torch.equal(lq, plain) == (case == "none")


def test_degradation_primitives():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 40, 40, generator=generator) * 0.5 + 0.25
    blurred = gaussian_blur(image, 2.0)
    assert blurred.shape == image.shape and blurred.std() < image.std() / 2
    assert torch.equal(gaussian_blur(image, 0.0), image)
    noisy = add_gaussian_noise(image, 10.0, generator)
    assert abs((noisy - image).std().item() - 10 / 255) < 0.005
    assert torch.equal(add_poisson_noise(image, 0.0, generator), image)
    assert 0.0 < (add_poisson_noise(image, 1.0, generator) - image).abs().mean() < 0.1
    jpeg = jpeg_compress(image, 20)
    assert jpeg.shape == image.shape and 0 < (jpeg - image).abs().mean() < 0.2
    assert jpeg_compress(image.unsqueeze(0).repeat(2, 1, 1, 1), 90).shape == (2, 3, 40, 40)
    for out in (blurred, noisy, jpeg):
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("bad", [{"blur_sigma": (2.0, 1.0)}, {"noise_sigma": (-1, 1)}, {"jpeg_quality": (0, 50)},
                                 {"poisson_scale": 3.0}])
def test_degrade_rejects_bad_ranges(bad):
    with pytest.raises(ValueError):
        degrade(torch.rand(3, 8, 8), 2, **bad)


# ---------------------------------------------------------------- demo set


def test_demo_split_is_disjoint_and_real():
    split = demo_images()
    train, val = set(split["train"]), set(split["val"])
    assert train and val and not train & val
    assert {path.name for path in val} <= set(DEMO_VAL)
    # Everyday photos from scikit-learn and matplotlib (dependencies) join the scientific ones on the training side.
    assert {"china.jpg", "flower.jpg", "grace_hopper.jpg"} <= {path.name for path in train}
    for path in train | val:
        image = load_image(path)
        assert image.ndim == 3 and min(image.shape[:2]) >= 128


def test_package_file_finds_installed_data_and_tolerates_absence():
    assert package_file("sklearn", "datasets/images/china.jpg").is_file()
    assert package_file("sklearn", "datasets/images/no_such.jpg") is None
    assert package_file("no_such_package_xyz", "a.jpg") is None


def test_prepare_demo_folders_is_idempotent(tmp_path):
    train_dir, val_dir = prepare_demo_folders(tmp_path)
    written = sorted(train_dir.glob("*.png")) + sorted(val_dir.glob("*.png"))
    assert len(written) == sum(len(v) for v in demo_images().values())
    stamps = [p.stat().st_mtime_ns for p in written]
    assert prepare_demo_folders(tmp_path) == (train_dir, val_dir)
    assert [p.stat().st_mtime_ns for p in written] == stamps
