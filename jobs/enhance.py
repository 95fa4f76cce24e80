"""Batch enhancement of an image folder with Ray Data: model-holding actors, tiled inference.

Locally (starts a local Ray unless $RAY_ADDRESS is set):
    python -m jobs.enhance --model models:/esrgan-x4@champion --input photos/ --output enhanced/
    python -m jobs.enhance --model ray_results/demo/checkpoint_000002 --input photos/ --output out/ --tile 128
On a cluster (input and output on storage every node sees, e.g. NFS):
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.enhance --model models:/esrgan-x4@champion --input /shared/in --output /shared/out \
        --use-gpu --tracking-uri http://<head>:5000

Every task the generator file was trained for (gan_core.checkpoint.generator_task; printed at the start):
    sr, denoise, lowlight (RGB)   each image of --input, enhanced (denoise and lowlight at x1)
    denoise, lowlight (gray)      each image's luma, written as a gray image
    fusion                        --input holds ir/ and vi/ with the same file names (TNO, RoadScene, LLVIP
                                  layout; a.png in ir/ pairs with a.jpg in vi/): one fused image per pair,
                                  named after the infrared file; in colour (the visible image's chroma, see
                                  gan_core.inference.recolour) when the visible image has colour, gray with --gray
    python -m jobs.train --config jobs/configs/denoise_demo.yaml --num-workers 2 --name denoise-demo
    python -m jobs.enhance --model ray_results/denoise-demo --input data/demo/val --output denoised/
    python -m jobs.enhance --model ray_results/<fusion run> --input data/demo/fusion/val --output fused/
    python -m jobs.enhance --model ray_results/<fusion run> --input data/demo/fusion/val --output fused/ --gray
A file of ir/ or vi/ without partner is skipped and listed with the failures, as an undecodable one is.

The driver resolves --model once and ships the generator's bytes to the actors (one per GPU with
--use-gpu, else --num-actors CPU actors), so workers need no MLflow access. Every image keeps its
relative path, name and format (JPEG at quality 95); a file (or pair) that cannot be read or enhanced is
skipped and reported, and the others are still written. Outputs are written atomically (temporary
name, then rename): a crashed run leaves no half-written image.

Memory. Tiles are rounded to uint8 as they come (gan_core.inference), so no float copy of an output
is ever made. A PNG output is streamed: each band of tile rows is PNG-filtered and deflated as soon
as it is computed (gan_core.data.images.PngWriter), so an actor holds the input, one band of output
rows (tile * scale rows) and one tile's activations, whatever the image size; the file is
byte-identical to what Pillow writes for the same pixels. (A disk-backed numpy memmap of the output,
encoded at the end, would bound memory too, but costs a temporary file of the raw output's size,
and Pillow's encoders would still copy the whole image into memory.) JPEG, WebP and the other
formats are encoded by Pillow from the whole uint8 output (3 bytes per output pixel, 48 per input
pixel at x4, plus Pillow's own copy), and so are gray results (1 byte per pixel, x1). A colour fusion
result is streamed too: each band of fused luma is recoloured with the same rows of the visible image.
--max-pixels (default 50 million input pixels) fails a larger input before it is decoded, naming the
file, its size and the limit; the others go on.

Exit status: 0 every image written; 1 some failed (a summary names each one and why, the others were
written); 2 bad arguments or nothing to enhance (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gan_core.inference import GPU_TILE_BATCH
from gan_core.portable import ARCH_HELP
from jobs.cli import JobError, init_ray, run_main
from jobs.progress import Progress
from jobs.tracking.model_source import MODEL_HELP
from jobs.tracking.server import check_tracking_server, resolve_tracking_uri

SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}
DEFAULT_MAX_PIXELS = 50_000_000
EXIT_SOME_FAILED = 1  # 2 is run_main's: a user error before anything was enhanced


def output_format(path: Path) -> str:
    """Pillow's format name for the suffix of `path` ("PNG", "JPEG", ...).

    Raises:
        ValueError: no writer for that suffix.
    """
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"no image writer for {path.suffix!r}")
    return fmt


def save_like(img: np.ndarray, path: Path) -> None:
    """Write uint8 HxWx3 `img` to `path` in the format its suffix names, atomically."""
    from PIL import Image

    from gan_core.files import atomic_write

    fmt = output_format(path)
    atomic_write(path, lambda file: Image.fromarray(img).save(file, format=fmt, **SAVE_OPTIONS.get(fmt, {})))


def save_png_bands(bands: Iterable[np.ndarray], path: Path, width: int, height: int) -> None:
    """Write a PNG that arrives as bands of uint8 rows (top to bottom), each as it arrives, atomically.

    The file holds the same bytes as save_like's for the same pixels (see PngWriter).
    """
    from gan_core.data.images import PngWriter
    from gan_core.files import atomic_write

    def write(file) -> None:
        writer = PngWriter(file, width, height)
        for band in bands:
            writer.write_rows(band)
        writer.close()

    atomic_write(path, write)


FUSION_LAYOUT = "fusion"  # gan_core.data.paired.PAIR_LAYOUTS: ir/ and vi/


def is_fusion(channels: tuple[int, int]) -> bool:
    """A fusion generator takes (infrared, visible luma) and gives the fused luma."""
    return channels == (2, 1)


class EnhanceActor:
    """One Ray Data actor: holds the generator, enhances and writes one image per row.

    A row is {"path"}: the image, relative to the input folder; for a fusion generator {"path", "ir", "vi"}: the
    output name and the pair's two files, relative to the input folder.
    """

    def __init__(self, generator_ref: list, input_dir: str, output_dir: str, tile: int | None,
                 tile_overlap: int, use_gpu: bool, threads: int, bf16: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, gray: bool = False, tile_batch: int = 1):
        import ray
        import torch

        from gan_core.checkpoint import load_generator

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "generator.pt"
            file.write_bytes(ray.get(generator_ref[0]))
            self.generator = load_generator(file, device=self.device)
        if use_gpu:  # convolutions in channels_last run faster on tensor cores (bf16 especially)
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.scale = int(self.generator.scale)
        self.input_dir, self.output_dir = Path(input_dir), Path(output_dir)
        self.tile, self.tile_overlap, self.bf16, self.tile_batch = tile, tile_overlap, bf16, tile_batch
        self.max_pixels = max_pixels
        self.gray = gray  # fusion: the fused luma as it is, even when the visible image has colour

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors, seconds, sizes = [], [], []
        for index, rel in enumerate(batch["path"]):
            start = time.perf_counter()
            try:
                pair = (batch["ir"][index], batch["vi"][index]) if "ir" in batch else None
                img = self._enhance_one(rel, pair)
                height, width = img.shape[0] * self.scale, img.shape[1] * self.scale
                errors.append("")
                sizes.append(f"{img.shape[1]}x{img.shape[0]} -> {width}x{height}")
            except Exception as err:  # noqa: BLE001 -- one bad file must not stop the others; it is reported
                errors.append(f"{type(err).__name__}: {err}")
                sizes.append("")
            seconds.append(time.perf_counter() - start)
        return {"path": np.asarray(batch["path"]), "error": np.asarray(errors, dtype=object),
                "seconds": np.asarray(seconds), "size": np.asarray(sizes, dtype=object)}

    def _enhance_one(self, rel: str, pair: tuple[str, str] | None) -> np.ndarray:
        """Enhance and write one image (or fuse one pair) into output_dir / rel; returns the input image."""
        from gan_core.data import load_image
        from gan_core.inference import (
            enhance_bands,
            enhance_image,
            generator_channels,
            model_input,
            recolour,
            recolour_bands,
            wants_colour,
        )

        target = self.output_dir / rel
        fmt = output_format(target)  # an unwritable suffix fails before the work, not after
        if pair is None:
            img, ir = load_image(self.input_dir / rel, max_pixels=self.max_pixels), None  # limit: before decoding
        else:  # fusion: img is the visible image
            ir = load_image(self.input_dir / pair[0], max_pixels=self.max_pixels)
            img = load_image(self.input_dir / pair[1], max_pixels=self.max_pixels)
        colour = wants_colour(self.generator, img, False if self.gray and pair is not None else None)
        x = model_input(self.generator, img, ir)  # the RGB image itself (no copy) for RGB generators
        settings = {"tile": self.tile, "tile_overlap": self.tile_overlap, "bf16": self.bf16,
                    "tile_batch": self.tile_batch}
        rgb_out = colour or generator_channels(self.generator)[1] == 3
        if fmt == "PNG" and rgb_out:  # streamed: one band of output rows in memory at a time
            bands = enhance_bands(self.generator, x, self.scale, self.device, **settings)
            save_png_bands(recolour_bands(bands, img) if colour else bands, target,
                           img.shape[1] * self.scale, img.shape[0] * self.scale)
        else:  # Pillow's encoders need the whole image; PngWriter writes RGB only
            out = enhance_image(self.generator, x, self.scale, self.device, **settings)
            save_like(recolour(out, img) if colour else out, target)
        return img


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """The checks that need no model: an input folder, and an output folder that is not the input.

    Raises:
        JobError: no input folder, or output equal to input.
    """
    if not input_dir.is_dir():
        raise JobError(f"--input {input_dir}: no such folder")
    if output_dir.resolve() == input_dir.resolve():
        raise JobError("--output must differ from --input: enhanced images keep their names")


def list_inputs(input_dir: Path, output_dir: Path) -> tuple[list[str], list[dict], list[dict]]:
    """The images to enhance (recursive, hidden files skipped, symlinks followed once), and what the walk
    could not use.

    Returns:
        (relative paths of the images, unreadable entries, symlinked folders not followed); the last two
        as {"path", "error"} dicts: broken symlinks and symlink loops are unreadable (counted as failed),
        loops back to a scanned folder are not followed (nothing under them is missed).

    Raises:
        JobError: no input folder, no image in it, or output inside input.
    """
    from gan_core.data.shards import scan_image_folder

    check_folders(input_dir, output_dir)
    scan = scan_image_folder(input_dir)
    files = [p.relative_to(input_dir).as_posix() for p in scan.files
             if output_dir.resolve() not in p.resolve().parents]
    if not files:
        raise JobError(f"--input {input_dir}: no image files (looked for the usual suffixes, recursively)")
    unreadable = [{"path": name, "error": reason} for name, reason in scan.unreadable]
    not_followed = [{"path": name, "error": reason} for name, reason in scan.not_followed]
    return files, unreadable, not_followed


def list_pairs(input_dir: Path, output_dir: Path) -> tuple[list[dict], list[dict]]:
    """The infrared / visible pairs of a fusion input folder (gan_core.data.paired.match_pairs on ir/ and vi/).

    Returns:
        (rows {"path": output name (the infrared file's path in ir/), "ir": "ir/<file>", "vi": "vi/<file>"},
        files without partner and unreadable entries as {"path", "error"} dicts, paths relative to input_dir).

    Raises:
        JobError: no input folder, no ir/ or vi/ in it, no pair, or the output inside ir/ or vi/.
    """
    from gan_core.data.paired import match_pairs, pair_folders

    check_folders(input_dir, output_dir)
    for folder in pair_folders(input_dir, FUSION_LAYOUT):
        if folder.resolve() == output_dir.resolve() or folder.resolve() in output_dir.resolve().parents:
            raise JobError(f"--output {output_dir} is inside {folder}: write the fused images elsewhere")
    try:
        pairs, problems = match_pairs(input_dir, FUSION_LAYOUT)
    except FileNotFoundError as err:
        raise JobError(f"--input {input_dir}: a fusion model takes pairs: {err}") from err
    if not pairs:
        raise JobError(f"--input {input_dir}: no pair (no file name is in both ir/ and vi/)")
    rows = [{"path": name, "ir": ir.relative_to(input_dir).as_posix(), "vi": vi.relative_to(input_dir).as_posix()}
            for name, ir, vi in pairs]
    return rows, [{"path": path, "error": reason} for path, reason in problems]


def actor_count(args: argparse.Namespace, n_files: int) -> int:
    """One actor per GPU with --use-gpu, else --num-actors (default: the cluster's CPUs less one)."""
    import ray

    resources = ray.cluster_resources()
    if args.use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise JobError("--use-gpu: the Ray cluster has no GPU")
        wanted = args.num_actors or gpus
    else:
        wanted = args.num_actors or max(1, int(resources.get("CPU", 1)) // args.cpus_per_actor - 1)
    return max(1, min(wanted, n_files))


def enhance_folder(generator_file: Path, args: argparse.Namespace, fusion: bool = False) -> dict:
    """Run the Ray Data pipeline over the folder (of pairs, for a fusion generator); returns the summary (also
    printed)."""
    import ray
    import ray.data

    input_dir, output_dir = Path(args.input), Path(args.output)
    if fusion:
        items, unreadable = list_pairs(input_dir, output_dir)
        not_followed, files, unit = [], [item["path"] for item in items], "pair"
    else:
        files, unreadable, not_followed = list_inputs(input_dir, output_dir)
        items, unit = [{"path": rel} for rel in files], "image"
    actors = actor_count(args, len(files))
    print(f"{'fusing' if fusion else 'enhancing'} {len(files)} {unit}(s) from {input_dir} into {output_dir} with "
          f"{actors} {'GPU' if args.use_gpu else 'CPU'} actor(s), tile {args.tile or 'off'}"
          + (f" x {args.tile_batch} per pass" if args.tile and args.tile_batch > 1 else ""), flush=True)
    start = time.perf_counter()
    # The weights go to the object store once; actors get a reference (wrapped in a list so Ray does not
    # inline it into the actor's constructor arguments, which a restarted actor could not recover).
    generator_ref = ray.put(generator_file.read_bytes())
    rows = ray.data.from_items(items, override_num_blocks=min(len(files), 4 * actors))
    results = rows.map_batches(
        EnhanceActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"generator_ref": [generator_ref], "input_dir": str(input_dir.resolve()),
                               "output_dir": str(output_dir.resolve()), "tile": args.tile or None,
                               "tile_overlap": args.tile_overlap, "use_gpu": args.use_gpu,
                               "threads": args.cpus_per_actor, "bf16": args.bf16,
                               "max_pixels": args.max_pixels or None, "gray": args.gray,
                               "tile_batch": args.tile_batch},
        num_cpus=args.cpus_per_actor, num_gpus=1 if args.use_gpu else 0,
    )
    done, failed = [], []
    with Progress(len(files), desc="fuse" if fusion else "enhance", unit=unit, stream=sys.stdout) as progress:
        for row in results.iter_rows():
            (failed if row["error"] else done).append(row)
            if row["error"]:  # failures at once; successes as the bar (terminal) or a line per 10% (logs)
                progress.write(f"FAILED {row['path']}: {row['error']}")
            progress.update()
    wall = time.perf_counter() - start
    failures = sorted(unreadable + [{"path": r["path"], "error": r["error"]} for r in failed], key=lambda f: f["path"])
    summary = {"written": len(done), "failed": failures, "not_followed": not_followed, "seconds": wall,
               "images_per_s": len(done) / wall if wall > 0 else 0.0, "actors": actors, "output": str(output_dir)}
    if fusion:
        summary["unmatched"] = len(unreadable)  # files without partner (and unreadable entries of ir/, vi/)
        counted = f"of {len(files)} pairs and {len(unreadable)} unmatched file(s)"
    else:
        counted = f"of {len(files) + len(unreadable)} images"
    print(f"written {len(done)}, failed {len(failures)} ({counted}) into "
          f"{output_dir} in {wall:.1f} s, {summary['images_per_s']:.2f} images/s (actor start-up included)")
    for item in failures:
        print(f"  failed {item['path']}: {item['error']}", file=sys.stderr)
    for item in not_followed:
        print(f"  not followed {item['path']}: {item['error']}", file=sys.stderr)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    tasks = next(part for part in __doc__.split("\n\n") if part.startswith("Every task"))
    parser = argparse.ArgumentParser(prog="python -m jobs.enhance", description=__doc__.split("\n\n")[0],
                                     epilog=tasks, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=MODEL_HELP)
    parser.add_argument("--input", required=True,
                        help="folder of images (searched recursively); for a fusion model a folder holding ir/ and "
                             "vi/ with the same file names")
    parser.add_argument("--arch", help="for plain weights (a BasicSR .pth): " + ARCH_HELP)
    parser.add_argument("--output", required=True, help="where enhanced images go, same relative paths and names")
    parser.add_argument("--gray", action="store_true",
                        help="fusion models: write the fused luma as a gray image even when the visible image has "
                             "colour (default: colour, the visible image's chroma put back)")
    parser.add_argument("--tile", type=int, default=256, help="LR tile side; 0 runs whole images (default 256)")
    parser.add_argument("--tile-overlap", type=int, default=16, help="LR pixels of context around each tile")
    parser.add_argument("--tile-batch", type=int,
                        help="tiles of a row run together, at most this many per forward pass (memory grows with "
                             "it; default 8 with --use-gpu, else 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one actor per GPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (about 2x faster on recent GPUs)")
    parser.add_argument("--num-actors", type=int, help="default: GPUs with --use-gpu, else the CPUs less one")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (torch threads) per actor")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest input in pixels (width x height): a larger one fails, named, before it is "
                             f"decoded, and the others go on; 0: no limit (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--report", help="also write the summary (failures included) to this JSON file")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    if args.tile < 0 or 0 < args.tile < 8:
        parser.error("--tile must be 0 (off) or at least 8")
    if args.tile_overlap < 0 or (args.num_actors is not None and args.num_actors < 1) or args.cpus_per_actor < 1:
        parser.error("--tile-overlap must be >= 0, --num-actors and --cpus-per-actor >= 1")
    if args.max_pixels < 0:
        parser.error("--max-pixels must be >= 0 (0: no limit)")
    if args.tile_batch is not None and args.tile_batch < 1:
        parser.error("--tile-batch must be at least 1")
    args.tile_batch = args.tile_batch or (GPU_TILE_BATCH if args.use_gpu else 1)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Resolve the model on the driver, then enhance the folder on Ray.

    Returns:
        The summary (also printed, and written to --report), when every image was written.

    Raises:
        SystemExit: with EXIT_SOME_FAILED (1) when some images failed, after the summary is printed
            and the report written; the other images are written.
        JobError: bad arguments or nothing to enhance (run_main makes it exit status 2).
    """
    import mlflow

    from gan_core.checkpoint import generator_task, load_generator, save_generator
    from gan_core.inference import generator_channels
    from jobs.tracking.model_source import is_mlflow_uri, resolve_model

    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    if is_mlflow_uri(args.model):
        check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    check_folders(Path(args.input), Path(args.output))  # bad folders fail before the model is fetched
    with tempfile.TemporaryDirectory(prefix="enhance-") as tmp:
        source = resolve_model(args.model, tmp)
        try:
            # A bad file fails here, once, not in every actor; the actors get a generator file (weights and
            # the full architecture), not optimizer states, whatever format --model was.
            generator = load_generator(source.path, arch=args.arch)
            task = generator_task(source.path)
            generator_file = save_generator(Path(tmp) / "generator.pt", generator)
        except ValueError as err:
            raise JobError(f"--model {args.model}: {err}") from err
        # The actors act on the generator's channels (2 -> 1: pairs in); the task names them.
        channels = generator_channels(generator)
        print(f"task {task.name}{' (gray)' if task.gray else ''}: generator {channels[0]} -> {channels[1]} "
              f"channel(s), x{generator.scale}", flush=True)
        if args.gray and not is_fusion(channels):
            raise JobError(f"--gray is for fusion models; this one is {task.name} ({channels[0]} -> {channels[1]} "
                           "channels)")
        # Listing the inputs (pairs for fusion) fails a bad folder before Ray starts.
        if is_fusion(channels):
            list_pairs(Path(args.input), Path(args.output))
        else:
            list_inputs(Path(args.input), Path(args.output))
        init_ray()
        summary = {"task": task.name, **enhance_folder(generator_file, args, fusion=is_fusion(channels))}
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    if summary["failed"]:
        print(f"{len(summary['failed'])} image(s) failed (listed above); the others were written", file=sys.stderr)
        sys.exit(EXIT_SOME_FAILED)
    return summary


if __name__ == "__main__":
    run_main(main)
