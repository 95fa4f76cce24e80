"""Score a generator on held-out images with its task's metrics, its task's baseline alongside, and LPIPS for RGB
outputs when its weights are present.

Locally:
    python -m jobs.evaluate --model models:/esrgan-x4@champion --data data/demo/val
    python -m jobs.evaluate --model ray_results/demo/checkpoint_000002 --data data/demo/val --json
    python -m jobs.evaluate --model runs:/<run_id> --data data/demo/val        # also logged to that run
    python -m jobs.evaluate --model denoise.pt --data data/demo/val --sigma 50 --baselines   # clean images
    python -m jobs.evaluate --model denoise.pt --data data/demo/denoise/val --baselines      # noisy/ clean/ pairs
    python -m jobs.evaluate --model fusion.pt --data data/demo/fusion/val                   # ir/ vi/ pairs
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.evaluate --model models:/esrgan-x4@champion --data /shared/val --tracking-uri http://<head>:5000

The task (sr, denoise, lowlight, fusion) is the one the model was trained for (its generator file says; files
that do not, such as plain BasicSR weights, are super-resolution): `--task` names it for plain weights. Metrics
and baselines per task (gan_core.tasks, gan_core.task_config.TASK_METRIC_KEYS):
    sr        PSNR / SSIM (RGB and Y, crop border = scale), vs bicubic upscaling of the same input
    denoise   PSNR / SSIM (RGB and Y), vs the noisy input itself; --baselines adds non-local means
    lowlight  PSNR / SSIM (RGB and Y), vs the dark input itself; --baselines adds gamma correction and CLAHE
    fusion    EN, SD, SF, MI, Qabf of the fused image, vs the plain average of the infrared and visible images
`--data` is a folder of clean images (the inputs are made as validation makes them: bicubic downscaling, or
noise / darkening seeded by --seed and each image), or a paired folder in the task's layout (noisy/ clean/,
low/ high/, ir/ vi/), whose inputs are used as they are.

Super-resolution follows BasicSR: HR images are mod-cropped, MATLAB-bicubic downscaled and rounded to 8 bits,
the output is rounded to uint8 and compared with the HR image. For blind SR,
    python -m jobs.evaluate --model <run> --data data/demo/val --degradation blind --config jobs/configs/blind_demo.yaml --seed 0
degrades each image with Real-ESRGAN's second-order pipeline (the recipe's data.blind, seeded by --seed and the
image), and bicubic upscales the same degraded input; metrics are logged as `eval/<data name>/blind/<metric>`. When the model comes from an MLflow run
(or --run-id is given) the means are logged to that run as `eval/<data name>/<metric>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gan_core.portable import ARCH_HELP
from jobs.cli import JobError, run_main
from jobs.tracking.model_source import MODEL_HELP
from jobs.tracking.server import TRACKING_HELP

# The rows of the table, in this order, for whichever of these keys the task reports: key -> label. A row's
# baseline is `<task.baseline>_<key>` (bicubic_psnr_y, input_psnr_y, average_qabf) when the task scores it.
METRIC_LABELS = {
    "psnr_y": "PSNR-Y (dB)",
    "ssim_y": "SSIM-Y",
    "psnr": "PSNR RGB (dB)",
    "ssim": "SSIM RGB",
    "lpips": "LPIPS (lower is better)",
    "hf_ratio": "HF energy / HR (1 = HR)",
    "en": "EN, entropy (bits)",
    "sd": "SD, contrast",
    "sf": "SF, spatial frequency",
    "mi": "MI, from IR + VI (bits)",
    "qabf": "Qabf, edges kept",
}
TASK_NAMES = ("sr", "denoise", "lowlight", "fusion")  # gan_core.task_config.TASK_NAMES (that module needs pydantic)
# How validation makes a task's input from a clean image (for the table's title); formatted with its section.
SYNTHETIC_INPUTS = {
    "denoise": "Gaussian noise, sigma {val_noise_sigma:g}",
    "lowlight": "darkened, scale * x ** gamma + noise",
}


@dataclasses.dataclass(frozen=True)
class ClassicalBaseline:
    """A training-free method scored like the model (gan_core.baselines)."""

    name: str
    apply: Callable  # (input uint8 H x W x 3, task, paired: bool) -> output uint8 H x W x 3


def _nlm(img, task, paired: bool):
    from gan_core.baselines import nlm_denoise

    # Synthetic inputs: the noise level they were made with; real noisy photos: estimated from the image.
    return nlm_denoise(img, None if paired else task.section.val_noise_sigma)


def _gamma(img, task, paired: bool):
    from gan_core.baselines import gamma_correct

    return gamma_correct(img)


def _clahe(img, task, paired: bool):
    from gan_core.baselines import clahe

    return clahe(img)


# What `--baselines` adds per task, next to the task's own baseline (bicubic, the input, the average).
CLASSICAL_BASELINES = {
    "sr": (),
    "denoise": (ClassicalBaseline("NLM", _nlm),),
    "lowlight": (ClassicalBaseline("gamma", _gamma), ClassicalBaseline("CLAHE", _clahe)),
    "fusion": (),
}


def task_of(section, scale: int = 1, seed: int = 0):
    """The gan_core Task of a task section (`gan_core.checkpoint.generator_task`), without a run config.

    Args:
        section: a TaskSection.
        scale: the generator's scale (super-resolution).
        seed: the seed of synthetic validation inputs (denoise, lowlight), as the run's train.seed.
    """
    from gan_core.tasks import Fusion, Restoration, SuperResolution

    builders = {
        "sr": lambda: SuperResolution(scale=scale),
        "denoise": lambda: Restoration(section, seed=seed),
        "lowlight": lambda: Restoration(section, seed=seed),
        "fusion": lambda: Fusion(section),
    }
    return builders[section.name]()


def model_task(model_file, generator: torch.nn.Module, requested: str | None = None, sigma: float | None = None,
               seed: int = 0):
    """The task a generator is scored for: the one its file records, or `requested` (--task) for files that do not
    say (plain weights are super-resolution otherwise); checked against the generator's channels.

    Args:
        model_file: the resolved generator file (ModelSource.path).
        generator: the loaded generator.
        requested: --task, or None.
        sigma: --sigma: the Gaussian noise of synthetic denoise inputs (task.val_noise_sigma), or None to keep it.
        seed: as in `task_of`.

    Raises:
        JobError: --task contradicts the file's task, or the generator's channels do not fit the task.
    """
    from gan_core.checkpoint import generator_task
    from gan_core.models import generator_config
    from gan_core.task_config import TaskSection

    arch = generator_config(generator)
    section = generator_task(model_file)
    if requested is not None and requested != section.name:
        if section.name != "sr":  # a file that records its task; "sr" is also what files without one say
            raise JobError(f"--task {requested}: the model was trained for task {section.name}")
        section = TaskSection(name=requested, gray=arch["num_in_ch"] == 1)
    if sigma is not None:
        section = section.model_copy(update={"val_noise_sigma": float(sigma)})
    channels = (arch["num_in_ch"], arch["num_out_ch"])
    if channels != section.channels:
        raise JobError(f"the generator maps {channels[0]} -> {channels[1]} channels, task {section.name} needs "
                       f"{section.channels[0]} -> {section.channels[1]}" +
                       ("; name its task with --task" if requested is None else ""))
    return task_of(section, int(arch.get("scale", 1)), seed)


def baseline_key(task, key: str) -> str:
    """The key of the task's baseline scored on the same images: psnr_y -> bicubic_psnr_y / input_psnr_y."""
    return f"{task.baseline}_{key}"


def compared_keys(task, means: dict[str, float]) -> list[str]:
    """The metrics scored for the model and its task's baseline both, in table order."""
    return [key for key in METRIC_LABELS if key in means and baseline_key(task, key) in means]


def checked_scale(generator: torch.nn.Module, requested: int | None) -> int:
    """The generator's scale, refusing a different --scale (a x2 model cannot be scored at x4).

    Raises:
        JobError: --scale disagrees with the generator.
    """
    scale = int(getattr(generator, "scale", requested or 4))
    if requested is not None and requested != scale:
        raise JobError(f"--scale {requested} does not match the generator's scale x{scale}")
    return scale


def format_table(means: dict[str, float], title: str, baseline: str = "bicubic") -> str:
    """A human-readable table: model, the task's baseline (bicubic, input, average), and the difference."""
    lines = [title, f"{'metric':<24}{'model':>10}{baseline:>10}{'gain':>10}"]
    for key, label in METRIC_LABELS.items():
        if key not in means:
            continue
        value = means[key]
        base = means.get(f"{baseline}_{key}")
        base_text = f"{base:>10.4f}" if base is not None else f"{'-':>10}"
        gain_text = f"{value - base:>+10.4f}" if base is not None else f"{'':>10}"
        lines.append(f"{label:<24}{value:>10.4f}{base_text}{gain_text}")
    return "\n".join(lines)


def format_methods(task, means: dict[str, float], classical: dict[str, dict[str, float]]) -> str:
    """One row per method (the model, the task's baseline, the classical baselines), one column per metric that
    the model and its baseline both have."""
    keys = compared_keys(task, means)
    rows = {"model": {key: means[key] for key in keys},
            task.baseline: {key: means[baseline_key(task, key)] for key in keys}}
    rows |= {name: {key: values.get(key, float("nan")) for key in keys} for name, values in classical.items()}
    lines = [f"{'method':<12}" + "".join(f"{key:>10}" for key in keys)]
    lines += [f"{name:<12}" + "".join(f"{row[key]:>10.4f}" for key in keys) for name, row in rows.items()]
    return "\n".join(lines)


@torch.no_grad()
def score_classical(task, images: list, scale: int = 1) -> dict[str, dict[str, float]]:
    """Mean metrics of the task's classical baselines (CLASSICAL_BASELINES) on the same pairs as the model:
    each method gets the task's `val_pair` input (uint8, RGB; a gray input repeated to 3 channels, the output's
    luma kept), and is scored by the task's `score`.

    Returns:
        method name -> means (the task's metric keys).
    """
    from gan_core.scoring import mean_metrics
    from gan_core.tasks import luma, to_rgb_uint8

    methods = CLASSICAL_BASELINES[task.name]
    sums: dict[str, dict[str, float]] = {method.name: {} for method in methods}
    for example in images:
        paired = example.shape[-1] == 6  # the input came with the example (gan_core.tasks.split_example)
        lq, gt = task.val_pair(example, scale)
        for method in methods:
            out = torch.from_numpy(method.apply(to_rgb_uint8(lq), task, paired)).permute(2, 0, 1)[None]
            out = out.float().div_(255.0)  # (1, 3, H, W)
            out = luma(out) if lq.shape[1] == 1 else out
            for key, value in task.score(out, lq, gt).items():
                sums[method.name][key] = sums[method.name].get(key, 0.0) + value
    return {name: mean_metrics({**values, "count": float(len(images))}) for name, values in sums.items()}


def describe_inputs(task, images: list, seed: int) -> str:
    """How the inputs of a x1 task were made, for the table's title."""
    if images and images[0].shape[-1] == 6:
        return "inputs from the paired folder"
    made = SYNTHETIC_INPUTS.get(task.name, "synthetic").format(**task.section.model_dump())
    return f"synthetic inputs ({made}; seed {seed} and each image)"


def metric_prefix(data: str | Path) -> str:
    """`eval/<data folder name>`: MLflow metric keys allow letters, digits and _-./ only."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(data).resolve().name) or "data"
    return f"eval/{name}"


def pair_maker(args: argparse.Namespace, task):
    """How held-out pairs are made: the task's own (`val_pair`: bicubic for sr), or the blind pipeline of --config.

    Raises:
        JobError: --config without --degradation blind, blind for another task than sr, or --config is not a
            valid recipe, or has no data.blind section.
    """
    from gan_core.config import BlindDegradationSection, ConfigError, load_config
    from gan_core.scoring import BlindValidationPairs

    if args.degradation == "bicubic":
        if args.config:
            raise JobError("--config is for --degradation blind")
        return None
    if task.baseline != "bicubic":
        raise JobError(f"--degradation blind degrades super-resolution inputs; this model's task is {task.name}")
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
    parser.add_argument("--data", required=True,
                        help="folder of clean (HR) images or of Parquet shards, or a paired folder in the task's "
                             "layout (noisy/ clean/, low/ high/, ir/ vi/)")
    parser.add_argument("--task", choices=TASK_NAMES,
                        help="the task of plain weights (default: the one the model file records, else sr)")
    parser.add_argument("--scale", type=int, choices=(1, 2, 4), help="checked against the generator's own scale")
    parser.add_argument("--arch", help="for plain weights (a BasicSR .pth): " + ARCH_HELP)
    parser.add_argument("--max-images", type=int, help="score only the first N images")
    parser.add_argument("--crop", type=int, help="centre-crop HR images to this side first (quick CPU runs)")
    parser.add_argument("--sigma", type=float,
                        help="denoise on clean images: the Gaussian noise sigma (0-255) of the synthetic inputs "
                             "(default: the model's task.val_noise_sigma, 25)")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the task's classical baselines on the same inputs (denoise: non-local "
                             "means; lowlight: gamma correction, CLAHE) and print one row per method")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--run-id", help="log the means to this MLflow run (default: the model's own run, if any)")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    parser.add_argument("--lpips-weights",
                        help="AlexNet backbone file or folder for LPIPS (else $GAN_CORE_WEIGHTS_DIR, hub cache)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--degradation", choices=("bicubic", "blind"), default="bicubic",
                        help="sr: how LR inputs are made: MATLAB bicubic (default), or Real-ESRGAN's second-order "
                             "pipeline of --config's data.blind (Real-ESRGAN's defaults without --config)")
    parser.add_argument("--config", help="--degradation blind: the recipe whose data.blind degrades the images")
    parser.add_argument("--seed", type=int, default=0,
                        help="the seed of --degradation blind, and of synthetic denoise / lowlight inputs")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns what --json prints."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from gan_core.checkpoint import load_generator
    from gan_core.models import generator_config
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
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        source = resolve_model(args.model, tmp)
        try:
            generator = load_generator(source.path, device=device, arch=args.arch)
        except ValueError as err:
            raise JobError(f"--model {args.model}: {err}") from err
        task = model_task(source.path, generator, args.task, args.sigma, args.seed)
    scale = checked_scale(generator, args.scale)
    make_pair = pair_maker(args, task)
    try:
        images = [img for _, img in load_eval_images(args.data, args.max_images, args.crop, task=task.name)]
    except FileNotFoundError as err:
        raise JobError(f"--data {err} (try `python -m jobs.prepare_data --demo`, then data/demo/val)") from err
    lpips, lpips_note = None, None
    if generator_config(generator)["num_out_ch"] == 3:  # LPIPS compares RGB images
        lpips, lpips_note = load_lpips(args.lpips_weights)
    try:
        means = evaluate_generator(generator, images, device, lpips, make_pair=make_pair, task=task)
    except ValueError as err:  # e.g. fusion data without its infrared images
        raise JobError(f"--data {args.data}: {err}") from err
    result = {"model": args.model, "data": str(args.data), "task": task.name, "baseline": task.baseline,
              "scale": scale, "images": len(images), "metrics": means,
              "degradation": args.degradation, "notes": [lpips_note] if lpips_note else []}
    if args.degradation == "blind":
        result["seed"] = args.seed
    if args.baselines:
        result["baselines"] = score_classical(task, images, scale)
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
        if task.baseline == "bicubic":  # super-resolution: the title it always had
            how = "" if args.degradation == "bicubic" else f", blind degradation (seed {args.seed})"
            title = f"{args.model} on {args.data}: {len(images)} images, x{scale}, crop border {scale}{how}"
        else:
            title = f"{args.model} on {args.data}: {len(images)} images, task {task.name}, {describe_inputs(task, images, args.seed)}"
        print(format_table(means, title, task.baseline))
        if args.baselines:
            print(format_methods(task, means, result["baselines"]))
        for note in result["notes"]:
            print(note)
        if run_id:
            print(f"logged to MLflow run {run_id} as {prefix}/<metric>")
    return result


if __name__ == "__main__":
    run_main(main)
