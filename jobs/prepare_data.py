"""Write a folder of images into Parquet shards of HR sub-images (what jobs.train reads with Ray Data).

    python -m jobs.prepare_data --demo
        photos shipped by scikit-image, scikit-learn, matplotlib -> data/demo/{train,val} and data/demo/train_shards (offline)
    python -m jobs.prepare_data --src /data/DIV2K_train_HR --out /data/div2k_shards --crop-size 480 --step 240
        BasicSR's sub-image extraction (480 px tiles every 240 px), as for its DIV2K recipes

Undecodable and too-small images (below --crop-size when cropping, else below 16 px), broken symlinks and
symlink loops are skipped, named and counted. The existing shards in --out are replaced only once the new ones
are all written: a source that yields nothing (an empty folder, a typo) or a crash leaves them as they were.
Exit status: 0 done, 2 nothing usable or bad arguments (one `error:` line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gan_core.data import prepare_demo_folders, write_shards
from gan_core.data.shards import MIN_IMAGE_SIDE, NoUsableImagesError, ShardReport
from jobs.cli import JobError, run_main
from jobs.progress import Progress

DEMO_ROOT = Path("data/demo")
DEMO_CROP, DEMO_STEP = 192, 96


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="build the offline demo data set under --root")
    parser.add_argument("--root", default=str(DEMO_ROOT), help="demo data folder (default data/demo)")
    parser.add_argument("--src", help="folder of HR images (searched recursively)")
    parser.add_argument("--out", help="output folder of Parquet shards")
    parser.add_argument("--crop-size", type=int, help="sub-image size (BasicSR uses 480 for DIV2K); default: whole images")
    parser.add_argument("--step", type=int, help="sub-image stride (default crop-size / 2)")
    parser.add_argument("--thresh-size", type=int, default=0, help="BasicSR's thresh_size for the last row/column")
    parser.add_argument("--min-size", type=int, default=0,
                        help=f"skip images whose shorter side is below this; never below --crop-size when cropping, "
                             f"else {MIN_IMAGE_SIDE} px")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    args = parser.parse_args(argv)

    if args.demo:
        train_dir, val_dir = prepare_demo_folders(Path(args.root))
        src, out = train_dir, Path(args.root) / "train_shards"
        crop, step = args.crop_size or DEMO_CROP, args.step or DEMO_STEP
        print(f"demo photos: train {train_dir} ({len(list(train_dir.iterdir()))}), validation {val_dir} "
              f"({len(list(val_dir.iterdir()))})")
    else:
        if not args.src or not args.out:
            parser.error("give --demo, or both --src and --out")
        src, out, crop = Path(args.src), Path(args.out), args.crop_size
        step = args.step or (crop // 2 if crop else None)
        if not src.is_dir():
            raise JobError(f"--src {src} is not a folder")
    progress: Progress | None = None

    def show(done: int, total: int) -> None:  # write_shards knows the total once it has listed the folder
        nonlocal progress
        progress = progress or Progress(total, desc="shards", unit="image")
        progress.set(done)

    try:
        report = write_shards(src, out, crop_size=crop, step=step, thresh_size=args.thresh_size,
                              min_size=args.min_size, rows_per_shard=args.rows_per_shard, progress=show)
    except NoUsableImagesError as err:
        _print_report(err.report)
        raise JobError(str(err)) from err
    except ValueError as err:  # a size argument out of range
        raise JobError(str(err)) from err
    finally:
        if progress is not None:
            progress.close()
    _print_report(report)
    print(f"shards: {out}")


def _print_report(report: ShardReport) -> None:
    print(report.summary())
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")


if __name__ == "__main__":
    run_main(main)
