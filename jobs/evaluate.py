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
the output is rounded to uint8 and compared with the HR image. When the model comes from an MLflow run
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

from jobs.cli import JobError, run_main
from jobs.tracking.model_source import MODEL_HELP
from jobs.tracking.server import TRACKING_HELP

TABLE_ROWS = (  # (label, model key, bicubic key)
    ("PSNR-Y (dB)", "psnr_y", "bicubic_psnr_y"),
    ("SSIM-Y", "ssim_y", "bicubic_ssim_y"),
    ("PSNR RGB (dB)", "psnr", None),
    ("SSIM RGB", "ssim", None),
    ("LPIPS (lower is better)", "lpips", None),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=MODEL_HELP)
    parser.add_argument("--data", required=True, help="folder of HR images, or of Parquet shards")
    parser.add_argument("--scale", type=int, choices=(1, 2, 4), help="checked against the generator's own scale")
    parser.add_argument("--max-images", type=int, help="score only the first N images")
    parser.add_argument("--crop", type=int, help="centre-crop HR images to this side first (quick CPU runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--run-id", help="log the means to this MLflow run (default: the model's own run, if any)")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    parser.add_argument("--lpips-weights",
                        help="AlexNet backbone file or folder for LPIPS (else $GAN_CORE_WEIGHTS_DIR, hub cache)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns what --json prints."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from gan_core.checkpoint import load_generator
    from gan_core.scoring import evaluate_generator, load_eval_images, load_lpips, pick_device
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
            generator = load_generator(source.path, device=device)
        except ValueError as err:
            raise JobError(f"--model {args.model}: {err}") from err
    scale = checked_scale(generator, args.scale)
    lpips, lpips_note = load_lpips(args.lpips_weights)
    means = evaluate_generator(generator, images, device, lpips)
    result = {"model": args.model, "data": str(args.data), "scale": scale, "images": len(images), "metrics": means,
              "notes": [lpips_note] if lpips_note else []}
    run_id = None if args.no_log else (args.run_id or source.run_id)
    if run_id:
        prefix = metric_prefix(args.data)
        MlflowClient().log_batch(run_id, metrics=[
            mlflow.entities.Metric(f"{prefix}/{k}", float(v), int(time.time() * 1000), 0)
            for k, v in means.items()])
        result["logged_to_run"] = run_id
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(means, f"{args.model} on {args.data}: {len(images)} images, x{scale}, crop border {scale}"))
        for note in result["notes"]:
            print(note)
        if run_id:
            print(f"logged to MLflow run {run_id} as {metric_prefix(args.data)}/<metric>")
    return result


if __name__ == "__main__":
    run_main(main)
