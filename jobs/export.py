"""Export a generator for deployment: ONNX (dynamic H and W, checked with onnxruntime) and int8.

Locally:
    python -m jobs.export --model models:/esrgan-x4@champion --data data/demo/val --output exported/
    python -m jobs.export --model ray_results/demo/checkpoint_000002 --data data/demo/val --output exported/ --no-int8
    python -m jobs.export --model fusion.pt --data data/demo/fusion/val --output exported/fusion   # ir/ vi/ pairs
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.export --model models:/esrgan-x4@champion --data /shared/val --output /shared/exported \
        --tracking-uri http://<head>:5000

Writes into --output:
- `generator.safetensors` (always) and `generator.pth` (`params_ema`, BasicSR layout) for chaiNNer, ComfyUI
  (both load through spandrel), BasicSR and Real-ESRGAN's scripts, when the generator is exactly BasicSR's
  RRDBNet; otherwise the safetensors file only, marked as loadable by gan_core only, and the reasons are
  printed (see gan_core.portable: such a file must never load elsewhere and compute something else);
- `generator.onnx` (and with --onnx-fp16 `generator_fp16.onnx`) and `generator_int8.pt` (see gan_core.deploy),
  and prints:
- the ONNX parity: max |onnxruntime - PyTorch| over the validation inputs at their own sizes (so the
  dynamic H and W are exercised), which must stay below --onnx-tolerance (the float16 file's, against the
  float32 model, below --onnx-fp16-tolerance); the graph takes the generator's
  input channels (3 RGB; 1 for gray denoise / lowlight; 2, infrared and visible luma, for fusion);
- the int8 model's size against fp32 and the change of its task's metric on the validation images (PSNR-Y
  and SSIM-Y for sr, denoise, lowlight; Qabf for fusion), the inputs made as jobs.evaluate makes them. The
  activation ranges are calibrated on --calib-data (default: the --data images, so the change is measured
  on the images it was calibrated on; pass a separate folder to avoid that bias). The int8 file stores the
  generator's full config, so every option (res_scale, upsample_skip) survives the round trip.
The export runs on the CPU (int8 kernels are CPU kernels; ONNX export traces on the CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gan_core.portable import ARCH_HELP
from jobs.cli import JobError, run_main
from jobs.tracking.model_source import MODEL_HELP
from jobs.tracking.server import TRACKING_HELP


def export_portable(generator, out: Path) -> dict:
    """generator.safetensors (+ generator.pth when BasicSR-exact) in `out`; prints where they load."""
    from gan_core.models import generator_config
    from gan_core.portable import write_portable

    files = write_portable(out, generator_config(generator), generator.state_dict(), step=0)
    if files.loadable_elsewhere:
        print(f"safetensors: {files.safetensors} and {files.pth} load in chaiNNer / ComfyUI (spandrel), BasicSR, "
              "Real-ESRGAN")
    else:
        print(f"safetensors: {files.safetensors} loads in gan_core only (not BasicSR's exact RRDBNet: "
              f"{'; '.join(files.problems)}); no .pth written")
    return {"safetensors": str(files.safetensors), "pth": str(files.pth) if files.pth else None,
            "loadable_elsewhere": files.loadable_elsewhere, "problems": list(files.problems)}


def model_inputs(images, task) -> list[torch.Tensor]:
    """The validation inputs (1, C_in, h, w) of held-out examples, as evaluation builds them (the task's
    `val_pair`: bicubic LR images for sr, seeded noisy / dark images, or stacked IR and visible luma)."""
    return [task.val_pair(img, getattr(task, "scale", 1))[0] for img in images]


def export_onnx_checked(generator, images, task, out_file: Path, tolerance: float, half: bool = False) -> dict:
    """Export (float16 with `half`), then compare onnxruntime with PyTorch (float32) on every validation input.

    Raises:
        JobError: the difference exceeds `tolerance`, or onnxruntime is missing.
    """
    from gan_core.deploy import export_onnx, onnx_max_abs_diff

    export_onnx(generator, out_file, half=half)
    inputs = model_inputs(images, task)
    try:
        diff = onnx_max_abs_diff(generator, out_file, inputs)
    except ImportError as err:
        raise JobError(str(err)) from err
    sizes = sorted({f"{x.shape[-1]}x{x.shape[-2]}" for x in inputs})
    print(f"ONNX{' float16' if half else ''}: {out_file} ({out_file.stat().st_size / 1e6:.2f} MB); "
          f"max |onnxruntime - torch| = {diff:.3e}{' (against the float32 model)' if half else ''} "
          f"over {len(inputs)} input(s) of size(s) {', '.join(sizes)}")
    if diff > tolerance:
        flag = "--onnx-fp16-tolerance" if half else "--onnx-tolerance"
        raise JobError(f"ONNX{' float16' if half else ''} output differs from PyTorch by {diff:.3e} > {flag} "
                       f"{tolerance:g}")
    return {"file": str(out_file), "max_abs_diff": diff, "bytes": out_file.stat().st_size}


def export_int8(generator, images, calib_images, task, out_file: Path, backend: str,
                keep_float: tuple[str, ...] = ()) -> dict:
    """Quantize (calibrated on `calib_images`), save, and score fp32 against int8 on `images` with the task's
    metrics.

    Returns:
        The file, sizes, and for the task's metric m (`task.gain`: psnr_y, or qabf for fusion) and SSIM-Y when the
        task has it: `<m>_fp32`, `<m>_int8`, `<m>_change`, and the baseline's value on the same inputs.
    """
    from gan_core.deploy import quantize_int8, save_int8, serialized_size
    from gan_core.scoring import evaluate_images, mean_metrics
    from jobs.tracking.registry import DESCRIBED

    cpu, scale = torch.device("cpu"), int(generator.scale)
    quantized = quantize_int8(generator, model_inputs(calib_images, task), backend=backend, keep_float=keep_float)
    save_int8(quantized, generator, out_file, backend=backend, keep_float=keep_float)
    fp32 = mean_metrics(evaluate_images(generator, images, scale, cpu, task=task))
    int8 = mean_metrics(evaluate_images(quantized, images, scale, cpu, task=task))
    sizes = {"fp32_bytes": serialized_size(generator), "int8_bytes": serialized_size(quantized)}
    _, metric, baseline_key = task.gain
    result = {"file": str(out_file), **sizes, "size_ratio": sizes["int8_bytes"] / sizes["fp32_bytes"],
              "metric": metric, f"{metric}_fp32": fp32[metric], f"{metric}_int8": int8[metric],
              f"{metric}_change": int8[metric] - fp32[metric], baseline_key: fp32[baseline_key]}
    if "ssim_y" in fp32:
        result |= {"ssim_y_fp32": fp32["ssim_y"], "ssim_y_int8": int8["ssim_y"]}
    result |= {"calibration_images": len(calib_images), "backend": backend, "keep_float": list(keep_float)}
    name, fmt, unit = DESCRIBED.get(metric, (metric, ".4f", ""))
    ssim = (f", SSIM-Y {int8['ssim_y']:.4f} vs {fp32['ssim_y']:.4f}" if "ssim_y" in fp32 else "")
    print(f"int8 ({backend}): {out_file}; weights {sizes['int8_bytes'] / 1e6:.3f} MB vs fp32 "
          f"{sizes['fp32_bytes'] / 1e6:.3f} MB ({result['size_ratio']:.2f}x); {name} {int8[metric]:{fmt}}{unit} vs "
          f"{fp32[metric]:{fmt}}{unit} ({result[f'{metric}_change']:+{fmt}}{unit}){ssim} on {len(images)} image(s) "
          f"(task {task.name}); calibrated on {len(calib_images)}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=MODEL_HELP)
    parser.add_argument("--data", required=True,
                        help="validation images (folder or shards), or a paired folder in the task's layout")
    parser.add_argument("--task", choices=("sr", "denoise", "lowlight", "fusion"),
                        help="the task of plain weights (default: the one the model file records, else sr)")
    parser.add_argument("--output", required=True, help="folder for generator.onnx and generator_int8.pt")
    parser.add_argument("--calib-data", help="calibration HR images (default: --data)")
    parser.add_argument("--max-images", type=int, help="use at most N validation (and calibration) images")
    parser.add_argument("--crop", type=int, help="centre-crop HR images to this side first (quick CPU runs)")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--arch", help="for plain weights (a BasicSR .pth): " + ARCH_HELP)
    parser.add_argument("--onnx-tolerance", type=float, default=1e-4, help="max allowed |onnxruntime - torch|")
    parser.add_argument("--onnx-fp16", action="store_true",
                        help="also write generator_fp16.onnx (float16 weights, input and output), checked the same way")
    parser.add_argument("--onnx-fp16-tolerance", type=float, default=1e-2,
                        help="max allowed |onnxruntime float16 - torch float32| (default 1e-2, about 3 levels of 255)")
    parser.add_argument("--backend", default="x86", choices=("x86", "fbgemm", "qnnpack"), help="int8 kernels")
    parser.add_argument("--keep-float", nargs="*", default=[], metavar="MODULE",
                        help="modules left in float (e.g. conv_first conv_last) when int8 costs too much PSNR")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    args = parser.parse_args(argv)
    if args.no_onnx and args.no_int8:
        parser.error("--no-onnx and --no-int8 together leave nothing to export")
    if args.no_onnx and args.onnx_fp16:
        parser.error("--onnx-fp16 writes an ONNX file: drop --no-onnx")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Export and check; returns {"onnx": ..., "int8": ...}."""
    from gan_core.checkpoint import load_generator
    from gan_core.scoring import load_eval_images
    from jobs.evaluate import model_task
    from jobs.tracking.model_source import is_mlflow_uri, resolve_model
    from jobs.tracking.server import connect

    args = parse_args(argv)
    connect(args.tracking_uri, check=is_mlflow_uri(args.model))
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        source = resolve_model(args.model, tmp)
        try:
            generator = load_generator(source.path, arch=args.arch)
        except ValueError as err:
            raise JobError(f"--model {args.model}: {err}") from err
        task = model_task(source.path, generator, args.task)
    try:
        images = [img for _, img in load_eval_images(args.data, args.max_images, args.crop, task=task.name)]
        calib = images
        if args.calib_data:
            calib = [img for _, img in load_eval_images(args.calib_data, args.max_images, args.crop, task=task.name)]
    except FileNotFoundError as err:
        raise JobError(f"--data / --calib-data {err}") from err
    try:
        model_inputs([images[0], calib[0]], task)  # data the task cannot use fails here, before any export
    except ValueError as err:  # e.g. fusion data without its infrared images
        raise JobError(f"--data / --calib-data: {err}") from err
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "task": task.name, "portable": export_portable(generator, out)}
    if not args.no_onnx:
        result["onnx"] = export_onnx_checked(generator, images, task, out / "generator.onnx", args.onnx_tolerance)
        if args.onnx_fp16:
            result["onnx_fp16"] = export_onnx_checked(generator, images, task, out / "generator_fp16.onnx",
                                                      args.onnx_fp16_tolerance, half=True)
    if not args.no_int8:
        result["int8"] = export_int8(generator, images, calib, task, out / "generator_int8.pt", args.backend,
                                     tuple(args.keep_float))
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
