"""Score a generator on held-out images: PSNR / SSIM (RGB and Y, crop border = scale), LPIPS when its
weights are present, and the bicubic baseline on the same inputs.

Locally:
    python -m jobs.evaluate --model models:/esrgan-x4@champion --data data/demo/val
    python -m jobs.evaluate --model ray_results/demo/checkpoint_000002 --data data/demo/val --json
    python -m jobs.evaluate --model runs:/<run_id> --data data/demo/val        # also logged to that run
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.evaluate --model models:/esrgan-x4@champion --data /shared/val --tracking-uri http://<head>:5000

Evaluation follows BasicSR: HR images are mod-cropped, MATLAB-bicubic downscaled and rounded to 8 bits,
the output is rounded to uint8 and compared with the HR image. For blind SR,
    python -m jobs.evaluate --model <run> --data data/demo/val --degradation blind --config jobs/configs/blind_demo.yaml --seed 0
degrades each image with Real-ESRGAN's second-order pipeline (the recipe's data.blind, seeded by --seed and the
image), and bicubic upscales the same degraded input; metrics are logged as `eval/<data name>/blind/<metric>`. When the model comes from an MLflow run
(or --run-id is given) the means are logged to that run as `eval/<data name>/<metric>`.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from gan_core.portable import ARCH_HELP
from jobs.cli import JobError, run_main
from jobs.tracking.model_source import MODEL_HELP
from jobs.tracking.server import TRACKING_HELP

TABLE_ROWS = (  # (label, model key, bicubic key)
    ("PSNR-Y (dB)", "psnr_y", "bicubic_psnr_y"),
    ("SSIM-Y", "ssim_y", "bicubic_ssim_y"),
    ("PSNR RGB (dB)", "psnr", None),
    ("SSIM RGB", "ssim", None),
    ("LPIPS (lower is better)", "lpips", None),
    ("HF energy / HR (1 = HR)", "hf_ratio", "bicubic_hf_ratio"),
)


def checked_scale(generator: torch.nn.Module, requested: int | None) -> int:
    """The generator's scale, refusing a different --scale (a x2 model cannot be scored at x4).

    Raises:
        JobError: --scale disagrees with the generator.
    """
    scale = int(getattr(generator, "scale", requested or 4))
    if requested is not None and requested != scale:
        raise JobError(f"--scale {requested} does not match the generator's scale x{scale}")
    return scale


def format_table(means: dict[str, float], title: str) -> str:
    """A human-readable table: model, bicubic baseline, and the difference."""
    lines = [title, f"{'metric':<24}{'model':>10}{'bicubic':>10}{'gain':>10}"]
    for label, key, base_key in TABLE_ROWS:
        if key not in means:
            continue
        value = means[key]
        base = means.get(base_key) if base_key else None
        base_text = f"{base:>10.4f}" if base is not None else f"{'-':>10}"
        gain_text = f"{value - base:>+10.4f}" if base is not None else f"{'':>10}"
        lines.append(f"{label:<24}{value:>10.4f}{base_text}{gain_text}")
    return "\n".join(lines)


def metric_prefix(data: str | Path) -> str:
    """`eval/<data folder name>`: MLflow metric keys allow letters, digits and _-./ only."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(data).resolve().name) or "data"
    return f"eval/{name}"


def pair_maker(args: argparse.Namespace):
    """How held-out pairs are made: `validation_pair` (bicubic), or the blind pipeline of --config.

    Raises:
        JobError: --config is not a valid recipe, or has no data.blind section.
    """
    from gan_core.config import BlindDegradationSection, ConfigError, load_config
    from gan_core.data import validation_pair
    from gan_core.scoring import BlindValidationPairs

    if args.degradation == "bicubic":
        if args.config:
            raise JobError("--config is for --degradation blind")
        return validation_pair
    if args.config is None:
        return BlindValidationPairs(BlindDegradationSection(), seed=args.seed)
    try:
        blind = load_config(args.config).data.blind
    except ConfigError as err:
        raise JobError(f"--config: {err}") from err
    if blind is None:
        raise JobError(f"--config {args.config} has no data.blind section to degrade with")
    return BlindValidationPairs(blind, seed=args.seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=MODEL_HELP)
    parser.add_argument("--data", required=True, help="folder of HR images, or of Parquet shards")
    parser.add_argument("--scale", type=int, choices=(1, 2, 4), help="checked against the generator's own scale")
    parser.add_argument("--arch", help="for plain weights (a BasicSR .pth): " + ARCH_HELP)
    parser.add_argument("--max-images", type=int, help="score only the first N images")
    parser.add_argument("--crop", type=int, help="centre-crop HR images to this side first (quick CPU runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--run-id", help="log the means to this MLflow run (default: the model's own run, if any)")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    parser.add_argument("--lpips-weights",
                        help="AlexNet backbone file or folder for LPIPS (else $GAN_CORE_WEIGHTS_DIR, hub cache)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--degradation", choices=("bicubic", "blind"), default="bicubic",
                        help="how LR inputs are made: MATLAB bicubic (default), or Real-ESRGAN's second-order "
                             "pipeline of --config's data.blind (Real-ESRGAN's defaults without --config)")
    parser.add_argument("--config", help="--degradation blind: the recipe whose data.blind degrades the images")
    parser.add_argument("--seed", type=int, default=0, help="--degradation blind: the degradation seed")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns what --json prints."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from gan_core.checkpoint import load_generator
    from gan_core.scoring import (
        evaluate_generator,
        load_eval_images,
        load_lpips,
        pick_device,
    )
    from jobs.tracking.model_source import is_mlflow_uri, resolve_model
    from jobs.tracking.server import connect

    args = parse_args(argv)
    connect(args.tracking_uri, check=is_mlflow_uri(args.model) or bool(args.run_id))
    try:
        images = [img for _, img in load_eval_images(args.data, args.max_images, args.crop)]
    except FileNotFoundError as err:
        raise JobError(f"--data {err} (try `python -m jobs.prepare_data --demo`, then data/demo/val)") from err
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        source = resolve_model(args.model, tmp)
        try:
            generator = load_generator(source.path, device=device, arch=args.arch)
        except ValueError as err:
            raise JobError(f"--model {args.model}: {err}") from err
    scale = checked_scale(generator, args.scale)
    lpips, lpips_note = load_lpips(args.lpips_weights)
    means = evaluate_generator(generator, images, device, lpips, make_pair=pair_maker(args))
    result = {"model": args.model, "data": str(args.data), "scale": scale, "images": len(images), "metrics": means,
              "degradation": args.degradation, "notes": [lpips_note] if lpips_note else []}
    if args.degradation == "blind":
        result["seed"] = args.seed
    run_id = None if args.no_log else (args.run_id or source.run_id)
    if run_id:
        prefix = metric_prefix(args.data) + ("/blind" if args.degradation == "blind" else "")
        MlflowClient().log_batch(run_id, metrics=[
            mlflow.entities.Metric(f"{prefix}/{k}", float(v), int(time.time() * 1000), 0)
            for k, v in means.items()])
        result["logged_to_run"] = run_id
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        how = "" if args.degradation == "bicubic" else f", blind degradation (seed {args.seed})"
        print(format_table(means, f"{args.model} on {args.data}: {len(images)} images, x{scale}, crop border {scale}{how}"))
        for note in result["notes"]:
            print(note)
        if run_id:
            print(f"logged to MLflow run {run_id} as {prefix}/<metric>")
    return result


if __name__ == "__main__":
    run_main(main)
