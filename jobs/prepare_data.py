"""Write a folder of images, or of image pairs, into Parquet shards (what jobs.train reads with Ray Data).

    python -m jobs.prepare_data --demo
        photos shipped by scikit-image, scikit-learn, matplotlib -> data/demo/{train,val} and data/demo/train_shards (offline)
    python -m jobs.prepare_data --demo --task denoise
        synthetic pairs made from the same photos -> data/demo/denoise/{train,val}/{noisy,clean} and
        data/demo/denoise/train_shards; likewise --task lowlight (low/ high/) and --task fusion (ir/ vi/: a
        synthetic stand-in made from the photos, not real infrared)
    python -m jobs.prepare_data --src /data/DIV2K_train_HR --out /data/div2k_shards --crop-size 480 --step 240
        BasicSR's sub-image extraction (480 px tiles every 240 px), as for its DIV2K recipes
    python -m jobs.prepare_data --task lowlight --src /data/LOL/our485 --out /data/lol_shards --crop-size 256
        pairs: --src holds low/ and high/ with the same file names (LOL); denoise noisy/ clean/; fusion ir/ vi/
        (TNO, RoadScene, LLVIP, M3FD: rename or link their infrared and visible folders to ir/ and vi/)
    python -m jobs.prepare_data --task denoise --src /data/DIV2K_train_HR --out /data/denoise_shards --crop-size 480
        denoise / lowlight from a plain folder of clean images (no noisy/ clean/ sub-folders): plain shards, the
        noisy or dark input is made during training

Undecodable and too-small images (below --crop-size when cropping, else below 16 px), broken symlinks and
symlink loops, and for pairs files without partner, pairs of two sizes and colour images in ir/ are skipped,
named and counted. A pair's tiles are cut at the same place in both images. The existing shards in --out are
replaced only once the new ones are all written: a source that yields nothing (an empty folder, a typo) or a
crash leaves them as they were.
Exit status: 0 done, 2 nothing usable or bad arguments (one `error:` line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gan_core.data import PAIR_LAYOUTS, prepare_task_demo, write_paired_shards, write_shards
from gan_core.data.shards import MIN_IMAGE_SIDE, NoUsableImagesError, ShardReport
from jobs.cli import JobError, run_main
from jobs.progress import Progress

DEMO_ROOT = Path("data/demo")
DEMO_CROP, DEMO_STEP = 192, 96
TASKS = ("sr", *PAIR_LAYOUTS)
# What training makes from a clean image when denoise / lowlight data has no pairs.
SYNTHETIC_INPUT = {"denoise": "noise is added", "lowlight": "darkening and noise are applied"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1].split("\nUndecodable")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="sr",
                        help="sr (default): single images; denoise, lowlight, fusion: pairs in sub-folders "
                             + ", ".join(f"{a}/ {b}/" for a, b in PAIR_LAYOUTS.values()))
    parser.add_argument("--demo", action="store_true",
                        help="build the offline demo data set of --task under --root (paired tasks: <root>/<task>)")
    parser.add_argument("--root", default=str(DEMO_ROOT), help="demo data folder (default data/demo)")
    parser.add_argument("--src", help="folder of images (searched recursively), or for pairs the folder of the "
                                      "two sub-folders")
    parser.add_argument("--out", help="output folder of Parquet shards")
    parser.add_argument("--crop-size", type=int, help="sub-image size (BasicSR uses 480 for DIV2K); default: whole images")
    parser.add_argument("--step", type=int, help="sub-image stride (default crop-size / 2)")
    parser.add_argument("--thresh-size", type=int, default=0, help="BasicSR's thresh_size for the last row/column")
    parser.add_argument("--min-size", type=int, default=0,
                        help=f"skip images whose shorter side is below this; never below --crop-size when cropping, "
                             f"else {MIN_IMAGE_SIDE} px")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    args = parser.parse_args(argv)

    paired = args.task != "sr"
    if args.demo:
        train_dir, val_dir = prepare_task_demo(Path(args.root), args.task)
        src = train_dir
        out = Path(args.root) / ("train_shards" if args.task == "sr" else f"{args.task}/train_shards")
        crop, step = args.crop_size or DEMO_CROP, args.step or DEMO_STEP
        what = "demo photos" if args.task == "sr" else f"{args.task} demo pairs (synthetic)"
        print(f"{what}: train {train_dir} ({_count(train_dir, args.task)}), validation {val_dir} "
              f"({_count(val_dir, args.task)})")
    else:
        if not args.src or not args.out:
            parser.error("give --demo, or both --src and --out")
        src, out, crop = Path(args.src), Path(args.out), args.crop_size
        step = args.step or (crop // 2 if crop else None)
        if not src.is_dir():
            raise JobError(f"--src {src} is not a folder")
        if paired:
            input_name, target_name = PAIR_LAYOUTS[args.task]
            if args.task in SYNTHETIC_INPUT and not (src / input_name).is_dir() and not (src / target_name).is_dir():
                paired = False
                print(f"{src} has no {input_name}/ and {target_name}/ sub-folders: writing plain shards of its images "
                      f"as {target_name} targets; the {input_name} input is made during training "
                      f"({SYNTHETIC_INPUT[args.task]})")
            else:
                print(f"{args.task} pairs: inputs from {src / input_name}, targets from {src / target_name}")
    progress: Progress | None = None

    def show(done: int, total: int) -> None:  # the writers know the total once they have listed the folder
        nonlocal progress
        progress = progress or Progress(total, desc="shards", unit="pair" if paired else "image")
        progress.set(done)

    sizes = dict(crop_size=crop, step=step, thresh_size=args.thresh_size, min_size=args.min_size,
                 rows_per_shard=args.rows_per_shard, progress=show)
    try:
        if paired:
            report = write_paired_shards(src, args.task, out, gray_input=args.task == "fusion", **sizes)
        else:
            report = write_shards(src, out, **sizes)
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


def _count(folder: Path, task: str) -> str:
    """'9 images' for sr, '9 pairs' for a paired task."""
    files = folder / PAIR_LAYOUTS[task][1] if task in PAIR_LAYOUTS else folder
    return f"{len(list(files.glob('*.png')))} {'pairs' if task in PAIR_LAYOUTS else 'images'}"


def _print_report(report: ShardReport) -> None:
    print(report.summary())
    for name, reason in report.skipped:
        print(f"  skipped {name}: {reason}")


if __name__ == "__main__":
    run_main(main)
