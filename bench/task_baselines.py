"""Classical baselines of the x1 tasks on the held-out demo photos, as markdown tables (the README's numbers).

    python -m jobs.prepare_data --demo                      # data/demo/val (the fusion pairs are made here too)
    python -m bench.task_baselines [--task denoise lowlight fusion] [--sigmas 15 25 50] [--crop 256]
    python -m bench.task_baselines --task denoise --model models:/denoise@champion --tracking-uri http://<head>:5000
    python -m bench.task_baselines --task fusion --model ray_results/fusion-demo --json

Every number is scored as jobs.evaluate scores it (the task's `val_pair` and `score`, gan_core.tasks):
  denoise   the clean photos of data/demo/val plus Gaussian noise at each --sigmas value (seeded per image):
            the noisy input against non-local means at that sigma (gan_core.baselines.nlm_denoise); PSNR-Y, SSIM-Y
  lowlight  the same photos darkened as validation darkens them (scale * x ** gamma + noise, seeded per image):
            the dark input against gamma correction (to mean luma 0.5) and CLAHE on the luma; PSNR-Y, SSIM-Y
  fusion    the synthetic IR / visible pairs of data/demo/fusion/val (`prepare_task_demo`, written when missing):
            the plain average of IR and visible luma; EN, SD, SF, MI, Qabf (gan_core.fusion_metrics)
--model (a generator file, checkpoint folder or MLflow URI, as jobs.evaluate's --model) adds its row to the table
of the task it was trained for (at every sigma for denoise).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TASKS = ("denoise", "lowlight", "fusion")
# The columns of each task's table: metric key -> header.
COLUMNS = {
    "denoise": {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y"},
    "lowlight": {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y"},
    "fusion": {"en": "EN", "sd": "SD", "sf": "SF", "mi": "MI", "qabf": "Qabf"},
}


def task_images(task_name: str, root: Path, max_images: int | None, crop: int | None) -> tuple[Path, list]:
    """The held-out examples of a task: the demo photos (clean images), or for fusion its IR / visible pairs."""
    from gan_core.data.demo import prepare_demo_folders, prepare_task_demo
    from gan_core.scoring import load_eval_images

    if task_name == "fusion":  # fusion has no synthetic form: its pairs are files
        _, folder = prepare_task_demo(root, "fusion")
    else:
        _, folder = prepare_demo_folders(root)
    return folder, [img for _, img in load_eval_images(folder, max_images, crop, task=task_name)]


def baseline_means(task, images: list) -> dict[str, float]:
    """The task's own baseline (the input; the average for fusion) on these examples: key -> mean."""
    from gan_core.scoring import mean_metrics

    prefix, sums = f"{task.baseline}_", {}
    for example in images:
        lq, gt = task.val_pair(example, 1)
        for key, value in task.score(gt, lq, gt).items():  # the baseline's keys do not depend on the output
            if key.startswith(prefix):
                sums[key.removeprefix(prefix)] = sums.get(key.removeprefix(prefix), 0.0) + value
    return mean_metrics({**sums, "count": float(len(images))})


def measure(task, images: list, model=None) -> dict[str, dict[str, float]]:
    """Rows of one table: method -> means. The task's baseline, its classical baselines, and the model."""
    from gan_core.scoring import evaluate_generator, pick_device
    from jobs.evaluate import score_classical

    rows = {task.baseline: baseline_means(task, images), **score_classical(task, images)}
    if model is not None:
        device = pick_device()
        rows["model"] = evaluate_generator(model, images, device, task=task)
    return rows


def markdown(title: str, columns: dict[str, str], rows: list[tuple[list[str], dict[str, float]]],
             leading: list[str]) -> str:
    """A markdown table: each row is (its leading cells, e.g. [sigma, method], its means)."""
    head = [*leading, *columns.values()]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, means in rows:
        values = [f"{means[key]:.4f}" if key.startswith(("ssim", "qabf")) else f"{means[key]:.2f}" for key in columns]
        lines.append("| " + " | ".join([*cells, *values]) + " |")
    return "\n".join(lines)


def load_model(spec: str, download_dir: str):
    """A generator and the task section its file records (sr when it does not say) from --model (as
    jobs.evaluate's)."""
    from gan_core.checkpoint import generator_task, load_generator
    from jobs.tracking.model_source import resolve_model

    source = resolve_model(spec, download_dir)
    return load_generator(source.path), generator_task(source.path)


def main(argv: list[str] | None = None) -> dict:
    from gan_core.task_config import TaskSection
    from jobs.evaluate import task_of
    from jobs.tracking.model_source import is_mlflow_uri
    from jobs.tracking.server import connect

    parser = argparse.ArgumentParser(prog="python -m bench.task_baselines", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--data-root", default="data/demo", help="the demo folder (prepare_data --demo)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[15.0, 25.0, 50.0],
                        help="denoise: Gaussian noise levels (0-255)")
    parser.add_argument("--crop", type=int, help="centre-crop each image to this side (quick runs)")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (with each image)")
    parser.add_argument("--model", help="also score this generator in the table of its task (jobs.evaluate's --model)")
    parser.add_argument("--tracking-uri", help="MLflow, for --model runs:/ or models:/")
    parser.add_argument("--json", action="store_true", help="also print every number as one JSON object")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    model, model_section = None, None
    tasks = list(args.task)
    with tempfile.TemporaryDirectory(prefix="task-baselines-") as tmp:
        if args.model:
            connect(args.tracking_uri, check=is_mlflow_uri(args.model))
            model, model_section = load_model(args.model, tmp)
            tasks += [] if model_section.name in tasks else [model_section.name]
    results: dict[str, dict[str, dict[str, float]]] = {}
    started = time.perf_counter()
    for name in tasks:
        folder, images = task_images(name, Path(args.data_root), args.max_images, args.crop)
        ours = model if model_section is not None and model_section.name == name else None
        section = model_section if ours is not None else TaskSection(name=name)
        # denoise: one block of rows per noise level; the other tasks have one setting
        settings = [{"val_noise_sigma": sigma} for sigma in args.sigmas] if name == "denoise" else [{}]
        rows = []
        for setting in settings:
            task = task_of(section.model_copy(update=setting), seed=args.seed)
            for method, means in measure(task, images, ours).items():
                label = [f"{setting['val_noise_sigma']:g}"] if setting else []
                rows.append(([*label, method], means))
                results.setdefault(name, {})[" @ sigma ".join([method, *label])] = means
        leading = ["sigma", "method"] if name == "denoise" else ["method"]
        how = {"denoise": "Gaussian noise", "lowlight": "darkened as validation darkens",
               "fusion": "synthetic IR / visible pairs"}[name]
        title = f"{name}: {len(images)} images of {folder}, {how} (seed {args.seed} and each image)"
        print(markdown(title, COLUMNS[name], rows, leading), end="\n\n")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
