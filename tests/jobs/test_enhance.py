"""jobs.enhance on a real local Ray cluster: actors hold the model, names and formats are kept,
a corrupt file is skipped and reported while the others are written, and the exit status says so."""

from __future__ import annotations

import io
import json
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gan_core.checkpoint import CHECKPOINT_FORMAT
from gan_core.data import load_image
from gan_core.inference import enhance_image
from gan_core.models import rrdb_tiny

pytestmark = pytest.mark.slow

TINY = {"name": "rrdb", "scale": 4, "num_feat": 16, "num_block": 1, "num_grow_ch": 8, "res_scale": 0.2}


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour image (gradients plus a little noise), so JPEG round trips stay recognisable."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 20, (height, width, 3))
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], axis=-1) + noise
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Input folder: PNG, JPEG in a subfolder, upper-case suffix, a corrupt PNG, a truncated JPEG, a text file,
    an image over the tests' --max-pixels, a broken symlink and a symlink loop."""
    root = tmp_path_factory.mktemp("enhance")
    inputs = root / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(photo(30, 40, 0)).save(inputs / "a.png")
    Image.fromarray(photo(24, 20, 1)).save(inputs / "sub" / "b.jpg", quality=95)
    Image.fromarray(photo(17, 23, 2)).save(inputs / "C.PNG")
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    jpeg = io.BytesIO()
    Image.fromarray(photo(64, 64, 3)).save(jpeg, format="JPEG")
    (inputs / "sub" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (inputs / "notes.txt").write_text("not an image, not reported")
    Image.fromarray(photo(50, 60, 4)).save(inputs / "big.png")  # 3000 pixels: over --max-pixels 2000 below
    os.symlink("nowhere.png", inputs / "sub" / "gone.png")
    os.symlink("..", inputs / "sub" / "up")  # a folder loop: in/sub/up/sub/up/...
    torch.manual_seed(0)
    generator = rrdb_tiny().eval()
    (root / "ckpt").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"generator": TINY}, "step": 1,
                "generator": generator.state_dict(), "generator_ema": None}, root / "ckpt" / "checkpoint.pt")
    return root, generator


def test_enhances_folder_keeps_names_formats_and_exits_1_naming_failed_files(ray_local, folder, capsys):
    from jobs.enhance import EXIT_SOME_FAILED, main

    root, generator = folder
    out = root / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(root / "ckpt"), "--input", str(root / "in"), "--output", str(out), "--tile", "16",
              "--tile-overlap", "8", "--num-actors", "2", "--max-pixels", "2000",
              "--report", str(root / "report.json")])
    assert exit_info.value.code == EXIT_SOME_FAILED == 1
    printed = capsys.readouterr()
    summary = json.loads((root / "report.json").read_text())  # written before the exit
    assert summary["written"] == 3 and summary["actors"] == 2
    failed = {f["path"]: f["error"] for f in summary["failed"]}
    assert sorted(failed) == ["big.png", "corrupt.png", "sub/gone.png", "sub/truncated.jpg"]
    assert "ImageDecodeError" in failed["corrupt.png"] and "ImageDecodeError" in failed["sub/truncated.jpg"]
    assert "60x50 = 3,000 pixels, more than max_pixels 2,000" in failed["big.png"] and "big.png" in failed["big.png"]
    assert failed["sub/gone.png"] == "broken symlink: nowhere.png does not exist"
    assert summary["not_followed"] == [{"path": "sub/up", "error": "symlink loop: leads back to ., not followed"}]
    # The summary is printed without --report: the counts, then every failed file with its reason.
    assert "written 3, failed 4 (of 7 images)" in printed.out and "images/s" in printed.out
    for path, error in failed.items():
        assert f"failed {path}: {error}" in printed.err
    assert "4 image(s) failed" in printed.err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["C.PNG", "a.png", "sub/b.jpg"]  # no temporary files, nothing for the bad ones
    for name, fmt, (h, w) in (("a.png", "PNG", (30, 40)), ("sub/b.jpg", "JPEG", (24, 20)), ("C.PNG", "PNG", (17, 23))):
        with Image.open(out / name) as im:
            assert im.format == fmt and im.size == (w * 4, h * 4)
    # The actors ran the same tiled inference as a local call (PNG is lossless: bit-exact) ...
    expected = enhance_image(generator, load_image(root / "in" / "a.png"), 4, tile=16, tile_overlap=8)
    np.testing.assert_array_equal(load_image(out / "a.png"), expected)
    # ... and the streamed PNG holds the bytes Pillow writes for those pixels (as before streaming).
    from PIL import features

    if features.version("zlib") == zlib.ZLIB_RUNTIME_VERSION:
        buffer = io.BytesIO()
        Image.fromarray(expected).save(buffer, format="PNG")
        assert (out / "a.png").read_bytes() == buffer.getvalue()


def test_all_written_returns_the_summary_and_exits_0(ray_local, folder, tmp_path):
    from jobs.enhance import main

    root, generator = folder
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes((root / "in" / "a.png").read_bytes())
    summary = main(["--model", str(root / "ckpt"), "--input", str(inputs), "--output", str(tmp_path / "out"),
                    "--num-actors", "1", "--tile", "8", "--tile-batch", "4"])
    assert summary["written"] == 1 and summary["failed"] == [] and (tmp_path / "out" / "a.png").is_file()
    # Tiles run 4 to a pass: the image tile by tile, to a rounding tie
    img = np.asarray(Image.open(inputs / "a.png").convert("RGB"))
    one_by_one = enhance_image(generator, img, 4, tile=8, tile_overlap=16)
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "a.png")).astype(int) - one_by_one).max() <= 1


def test_bad_arguments_fail_clearly(ray_local, folder, capsys):
    from jobs.cli import run_main
    from jobs.enhance import main

    root, _ = folder
    cases = [
        (["--model", str(root / "ckpt"), "--input", str(root / "missing"), "--output", str(root / "o")],
         "no such folder"),
        (["--model", str(root / "ckpt"), "--input", str(root / "in"), "--output", str(root / "in")], "must differ"),
        (["--model", str(root / "nothing"), "--input", str(root / "in"), "--output", str(root / "o")], "no such file"),
        (["--model", str(root / "in" / "corrupt.png"), "--input", str(root / "in"), "--output", str(root / "o")],
         "--model"),
        (["--model", str(root / "ckpt"), "--input", str(root / "in"), "--output", str(root / "o"), "--use-gpu"]
         if not torch.cuda.is_available() else None, "no GPU"),
    ]
    for argv, message in cases:
        if argv is None:
            continue
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda argv=argv: main(argv))
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    for bad in (["--tile", "4"], ["--tile-batch", "0"]):
        with pytest.raises(SystemExit):
            main(["--model", "x", "--input", "y", "--output", "z", *bad])


def test_fusion_model_fuses_ir_vi_pairs_and_counts_the_unmatched_file(ray_local, tmp_path, capsys):
    from gan_core.inference import enhance
    from gan_core.checkpoint import save_generator
    from gan_core.models import build_generator
    from jobs.enhance import EXIT_SOME_FAILED, main

    torch.manual_seed(0)
    generator = build_generator(scale=1, num_in_ch=2, num_out_ch=1, num_feat=8, num_block=1, num_grow_ch=4).eval()
    model = save_generator(tmp_path / "fusion.pt", generator, 1, task={"name": "fusion"})
    root = tmp_path / "pairs"
    (root / "ir").mkdir(parents=True)
    (root / "vi").mkdir()
    visible = photo(22, 30, 5)  # 22 is not a multiple of 4: the x1 RRDB pads
    ir = photo(22, 30, 6)[..., 0]
    Image.fromarray(ir).save(root / "ir" / "a.png")
    Image.fromarray(visible).save(root / "vi" / "a.png")  # colour visible: a colour result
    Image.fromarray(ir[:, ::-1].copy()).save(root / "ir" / "b.png")
    Image.fromarray(visible[..., 1]).save(root / "vi" / "b.jpg", quality=95)  # gray visible, other suffix
    Image.fromarray(ir).save(root / "ir" / "lonely.png")  # no partner in vi/
    out = tmp_path / "fused"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model), "--input", str(root), "--output", str(out), "--tile", "16",
              "--tile-overlap", "8", "--num-actors", "1", "--report", str(tmp_path / "report.json")])
    assert exit_info.value.code == EXIT_SOME_FAILED
    printed = capsys.readouterr()
    assert "task fusion: generator 2 -> 1 channel(s), x1" in printed.out
    assert "written 2, failed 1 (of 2 pairs and 1 unmatched file(s))" in printed.out
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["task"] == "fusion" and summary["written"] == 2 and summary["unmatched"] == 1
    assert summary["failed"] == [{"path": "ir/lonely.png", "error": "no partner in vi/"}]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # named after the pair (the IR file)
    with Image.open(out / "a.png") as colour, Image.open(out / "b.png") as gray:
        assert (colour.mode, colour.size, gray.mode, gray.size) == ("RGB", (30, 22), "L", (30, 22))
    np.testing.assert_array_equal(load_image(out / "a.png"),
                                  enhance(generator, visible, 1, ir=ir, tile=16, tile_overlap=8))

    # --gray: the fused luma of the colour pair as it is; for a model that is not a fusion one, a usage error.
    (root / "ir" / "lonely.png").unlink()
    (root / "vi" / "b.jpg").unlink()
    (root / "ir" / "b.png").unlink()
    summary = main(["--model", str(model), "--input", str(root), "--output", str(tmp_path / "gray"), "--gray",
                    "--num-actors", "1"])
    assert summary["written"] == 1 and summary["failed"] == []
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "gray" / "a.png")),
                                  enhance(generator, visible, 1, ir=ir, colour=False, tile=256))
    sr_model = save_generator(tmp_path / "sr.pt", rrdb_tiny(), 1)
    from jobs.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(["--model", str(sr_model), "--input", str(root), "--output", str(tmp_path / "x"),
                               "--gray"]))
    assert exit_info.value.code == 2 and "--gray is for fusion models; this one is sr" in capsys.readouterr().err
