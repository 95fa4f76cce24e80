"""Paired data (denoise noisy/clean, lowlight low/high, fusion ir/vi): matching, checks, shards, demo pairs."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gan_core.data import (
    PAIR_LAYOUTS,
    SHARD_SCHEMA,
    ImageDecodeError,
    NoUsableImagesError,
    PairError,
    decode_example,
    encode_png,
    is_paired_folder,
    load_pairs,
    load_shard_images,
    match_pairs,
    read_shards,
    split_pair,
    stack_pair,
    write_paired_shards,
    write_shards,
)
from gan_core.data.demo import synthetic_infrared_visible, synthetic_low_light, synthetic_noisy
from tests.gan_core.conftest import random_rgb


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _smooth_rgb(height, width, seed=0):
    """A colour image with broad gradients (a photo-like JPEG test subject)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- matching


def test_match_pairs_on_relative_path_without_extension(tmp_path):
    root = tmp_path / "tno"
    for name in ("ir/a.png", "vi/a.jpg", "ir/sub/b.png", "vi/sub/b.bmp", "ir/.hidden.png", "vi/.hidden.png",
                 "vi/c.png", "ir/sub/c.png", "ir/d.png", "ir/d.jpg", "vi/d.png"):
        _save(random_rgb(8, 8), root / name)
    (root / "vi" / "notes.txt").write_text("not an image")
    pairs, problems = match_pairs(root, "fusion")
    assert [(name, a.relative_to(root).as_posix(), b.relative_to(root).as_posix()) for name, a, b in pairs] == [
        ("a.png", "ir/a.png", "vi/a.jpg"), ("sub/b.png", "ir/sub/b.png", "vi/sub/b.bmp")]
    assert problems == [
        ("ir/d.jpg", "2 files in ir/ share the name d: rename all but one"),
        ("ir/d.png", "2 files in ir/ share the name d: rename all but one"),
        ("ir/sub/c.png", "no partner in vi/"),  # matched on the relative path: sub/c is not c
        ("vi/c.png", "no partner in ir/"),
        ("vi/d.png", "its partner in ir/ is ambiguous (d.jpg, d.png)"),
    ]
    assert is_paired_folder(root, "fusion") and not is_paired_folder(root, "lowlight")


def test_missing_sub_folder_names_the_expected_layout(tmp_path):
    (tmp_path / "ir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected .*/ir and .*/vi with the same file names \(TNO / RoadScene"):
        match_pairs(tmp_path, "fusion")
    with pytest.raises(ValueError, match="unknown pair layout 'sr'; valid: denoise, lowlight, fusion"):
        match_pairs(tmp_path, "sr")
    assert PAIR_LAYOUTS["lowlight"] == ("low", "high")


# ---------------------------------------------------------------- stacking


def test_stack_pair_refuses_two_sizes_and_colour_infrared():
    noisy, clean = random_rgb(48, 64, seed=1), random_rgb(50, 64, seed=2)
    with pytest.raises(PairError, match=r"x\.png: the input is 64x48 px, the target 64x50 px"):
        stack_pair(noisy, clean, "x.png")
    example = stack_pair(noisy, clean[:48], "x.png")
    assert example.shape == (48, 64, 6) and example.dtype == np.uint8
    noisy_back, clean_back = split_pair(example)
    np.testing.assert_array_equal(noisy_back, noisy)
    np.testing.assert_array_equal(clean_back, clean[:48])
    with pytest.raises(PairError, match="x.png: the infrared image has colour .*expected a single-channel IR image"):
        stack_pair(_smooth_rgb(48, 64), clean[:48], "x.png", gray_input=True)
    with pytest.raises(ValueError, match=r"\(H, W, 6\)"):
        split_pair(noisy)


def test_gray_infrared_saved_as_rgb_jpeg_is_accepted_as_gray():
    # Infrared frames shipped as 3-channel JPEGs: the channels come back a level or two apart.
    gray = _smooth_rgb(64, 80)[..., 1]
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(buffer, format="JPEG", quality=75)
    decoded = np.asarray(Image.open(buffer).convert("RGB"))
    example = stack_pair(decoded, random_rgb(64, 80), "ir.jpg", gray_input=True)
    infrared = example[..., :3]
    assert (infrared == infrared[..., :1]).all()  # 3 equal channels
    assert np.abs(infrared[..., 0].astype(int) - gray).max() <= 8


def test_load_pairs_skips_and_names_every_bad_pair(tmp_path):
    root = tmp_path / "LOL" / "our485"
    _save(random_rgb(40, 60, seed=1), root / "low" / "1.png")
    _save(random_rgb(40, 60, seed=2), root / "high" / "1.png")
    _save(random_rgb(40, 60), root / "low" / "2.png")  # no partner
    _save(random_rgb(40, 60), root / "high" / "22.png")
    _save(random_rgb(40, 60), root / "low" / "3.png")  # two sizes
    _save(random_rgb(30, 60), root / "high" / "3.png")
    (root / "low" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")  # undecodable, both
    (root / "high" / "4.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    examples, problems = load_pairs(root, "lowlight")
    assert [name for name, _ in examples] == ["1.png"]
    low, high = split_pair(examples[0][1])
    np.testing.assert_array_equal(low, random_rgb(40, 60, seed=1))
    np.testing.assert_array_equal(high, random_rgb(40, 60, seed=2))
    reasons = dict(problems)
    assert sorted(reasons) == ["3.png", "high/22.png", "high/4.jpg", "low/2.png", "low/4.png"]
    assert reasons["low/2.png"] == "no partner in high/" and reasons["high/22.png"] == "no partner in low/"
    assert reasons["3.png"] == "the input is 60x40 px, the target 60x30 px; a pair needs one size"
    assert reasons["low/4.png"].startswith("UnidentifiedImageError") and reasons["high/4.jpg"]


# ---------------------------------------------------------------- shards


@pytest.fixture
def fusion_folder(tmp_path):
    """Two ir/vi pairs (gray IR as 8-bit PNG), one colour 'IR', one pair too small."""
    root = tmp_path / "roadscene"
    _save(random_rgb(70, 100, seed=1)[..., 0], root / "ir" / "a.png")
    _save(random_rgb(70, 100, seed=2), root / "vi" / "a.png")
    _save(random_rgb(40, 36, seed=3)[..., 0], root / "ir" / "b.png")
    _save(random_rgb(40, 36, seed=4), root / "vi" / "b.png")
    _save(_smooth_rgb(40, 40), root / "ir" / "colour.png")
    _save(random_rgb(40, 40), root / "vi" / "colour.png")
    _save(random_rgb(10, 10, seed=5)[..., 0], root / "ir" / "tiny.png")
    _save(random_rgb(10, 10, seed=6), root / "vi" / "tiny.png")
    return root


def test_paired_shards_cut_the_same_windows_from_both_images(tmp_path, fusion_folder):
    out = tmp_path / "shards"
    calls = []
    report = write_paired_shards(fusion_folder, "fusion", out, gray_input=True, crop_size=32, step=16,
                                 rows_per_shard=7, progress=lambda done, total: calls.append((done, total)))
    assert report.files_read == 8 and calls[-1] == (4, 4)
    assert dict(report.skipped) == {
        "colour.png": "the infrared image has colour (3 different channels); expected a single-channel IR image",
        "tiny.png": "10x10 px: shorter side below crop_size 32",
    }
    rows = list(read_shards(out))
    # BasicSR's windows: a (70x100): rows 0, 16, 32, 38 x columns 0, 16, 32, 48, 64, 68; b (40x36): 0, 8 x 0, 4.
    assert len(rows) == report.rows_written == 4 * 6 + 2 * 2
    sources = {"a.png": (random_rgb(70, 100, seed=1)[..., 0], random_rgb(70, 100, seed=2)),
               "b.png": (random_rgb(40, 36, seed=3)[..., 0], random_rgb(40, 36, seed=4))}
    for row in rows:
        y, x = map(int, row["tile"].split("_"))
        infrared, visible = sources[row["source"]]
        assert Image.open(io.BytesIO(row["input"])).mode == "L"  # gray IR stays one channel on disk
        example = decode_example(row["image"], row["input"], row["source"])  # (32, 32, 6)
        ir_tile, vi_tile = split_pair(example)
        np.testing.assert_array_equal(vi_tile, visible[y : y + 32, x : x + 32])
        np.testing.assert_array_equal(ir_tile, np.repeat(infrared[y : y + 32, x : x + 32, None], 3, axis=2))
    named = dict(load_shard_images(out))
    assert named["a.png@38_68"].shape == (32, 32, 6)


def test_denoise_pairs_whole_images(tmp_path):
    root = tmp_path / "sidd"
    _save(random_rgb(30, 40, seed=1), root / "noisy" / "scene" / "0001.png")
    _save(random_rgb(30, 40, seed=2), root / "clean" / "scene" / "0001.png")
    write_paired_shards(root, "denoise", tmp_path / "shards")
    [(name, example)] = load_shard_images(tmp_path / "shards")
    assert name == "scene/0001.png"
    np.testing.assert_array_equal(example, np.concatenate([random_rgb(30, 40, seed=1), random_rgb(30, 40, seed=2)], 2))


def test_old_shards_without_input_column_still_read(tmp_path):
    old_schema = pa.schema([field for field in SHARD_SCHEMA if field.name != "input"])
    image = random_rgb(20, 24)
    table = pa.Table.from_pylist([{"image": encode_png(image), "height": 20, "width": 24, "source": "old.png",
                                   "tile": ""}], schema=old_schema)
    out = tmp_path / "shards"
    out.mkdir()
    pq.write_table(table, out / "part-00000.parquet")
    [(name, decoded)] = load_shard_images(out)
    assert name == "old.png" and decoded.shape == (20, 24, 3)
    np.testing.assert_array_equal(decoded, image)
    assert [row["input"] for row in read_shards(out, columns=["source", "input"])] == [None]
    assert "input" not in next(read_shards(out))  # all columns: what the file holds


def test_unpaired_rows_have_a_null_input(tmp_path):
    _save(random_rgb(20, 20), tmp_path / "src" / "x.png")
    write_shards(tmp_path / "src", tmp_path / "shards")
    assert [row["input"] for row in read_shards(tmp_path / "shards")] == [None]
    assert pq.read_schema(next((tmp_path / "shards").glob("*.parquet"))).field("input").nullable


def test_decode_example_refuses_a_pair_of_two_sizes():
    with pytest.raises(ImageDecodeError, match="input is 8x6 px, target 8x8 px"):
        decode_example(encode_png(random_rgb(8, 8)), encode_png(random_rgb(6, 8)), "row 3")


def test_nothing_usable_leaves_existing_shards_alone(tmp_path, fusion_folder):
    out = tmp_path / "shards"
    write_paired_shards(fusion_folder, "fusion", out, gray_input=True, crop_size=16, rows_per_shard=3)
    before = _folder_bytes(out)
    assert len(before) > 3
    unusable = tmp_path / "unusable"
    _save(random_rgb(40, 40), unusable / "ir" / "1.png")  # colour: refused with gray_input
    _save(random_rgb(40, 40), unusable / "vi" / "1.png")
    _save(random_rgb(40, 40), unusable / "vi" / "2.png")
    with pytest.raises(NoUsableImagesError, match="no usable pair in .*: 1 pairs, all skipped; nothing written"):
        write_paired_shards(unusable, "fusion", out, gray_input=True, crop_size=16)
    (unusable / "ir" / "1.png").rename(unusable / "ir" / "3.png")
    with pytest.raises(NoUsableImagesError, match=r"no pair in .*: no file name is in both ir/ and vi/ \(3 image"):
        write_paired_shards(unusable, "fusion", out, gray_input=True)
    with pytest.raises(FileNotFoundError):
        write_paired_shards(tmp_path / "nowhere", "fusion", out)
    assert _folder_bytes(out) == before  # byte-identical, no staging folder left
    with pytest.raises(NoUsableImagesError):
        write_paired_shards(unusable, "fusion", tmp_path / "new" / "shards")
    assert not (tmp_path / "new" / "shards").exists()


# ---------------------------------------------------------------- synthetic demo pairs


def _rng(name):
    return np.random.default_rng([1, zlib.crc32(name.encode())])


def test_synthetic_pairs_are_seeded_and_degrade_as_documented():
    photo = _smooth_rgb(96, 128, seed=3)
    noisy = synthetic_noisy(photo, _rng("a.png"))
    np.testing.assert_array_equal(noisy, synthetic_noisy(photo, _rng("a.png")))
    assert 5 * 0.8 < np.std(noisy.astype(float) - photo) < 50 * 1.2  # sigma in [5, 50], less clipping
    low = synthetic_low_light(photo, _rng("a.png"))
    assert low.mean() < 0.6 * photo.mean()  # scale <= 0.6, gamma >= 2
    infrared, visible = synthetic_infrared_visible(photo, _rng("a.png"))
    assert infrared.shape == photo.shape[:2] and visible.shape == photo.shape
    assert not np.array_equal(visible, photo)  # a region is darkened or hazy
    assert (np.abs(visible.astype(int) - photo) <= 1).mean() > 0.3  # ... the rest is the photo
