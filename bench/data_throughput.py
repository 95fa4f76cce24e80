"""Data or compute: patches/s per core of each data stage against the training step's img/s, in one run.

    python -m bench.data_throughput [--quick] [--patch 128] [--batch 16] [--tile 480] [--recipe jobs/configs/demo.yaml]

Every CPU row runs in this process with one torch thread, so it reads as "per core":
  decode + crop        PNG tile -> random patch + flips (gan_core.data.stream.crop_row, no LR), per row
  decode + crop + LR   the same plus the bicubic LR input: what a `data.loader=stream` task does per row
  first order          gan_core.data.degradations.degrade on a batch (blur, noise, JPEG; BasicSR-style ranges)
  second order         Real-ESRGAN's pipeline on a batch (gan_core.data.realesrgan.BlindPairs, defaults of
                       train_realesrgan_x4plus.yml, no pool); skipped with a note when the module is missing
  train step           gan_core.step.train_step of the recipe (pixel-only and GAN phases) on the same patch size
With CUDA, the batch stages and the training step run on the GPU too. A run is data-bound when the patches/s
that its data cores deliver are below the img/s of its training step: the last lines print how many data
cores one training process needs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from gan_core.config import load_config
from gan_core.data import encode_png
from gan_core.data.pairs import make_lq
from gan_core.data.stream import crop_row

FIRST_ORDER = {"blur_sigma": (0.2, 3.0), "noise_sigma": (1.0, 30.0), "poisson_scale": (0.0, 0.0),
               "jpeg_quality": (30, 95)}


def synthetic_tile(size: int, seed: int) -> np.ndarray:
    """A photo-like uint8 (size, size, 3) tile: smooth shapes plus fine noise (PNG compresses it like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, max(size // 16, 2), max(size // 16, 2)), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    noisy = smooth.permute(1, 2, 0).numpy() * 235 + rng.normal(0, 6, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def rate(work: Callable[[], int], seconds: float, min_calls: int = 2) -> float:
    """Items per second of `work` (returns how many items it made), after one warm-up call."""
    work()
    done, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        done += work()
        calls += 1
    return done / (time.perf_counter() - start)


def data_rows(args, device: torch.device) -> list[tuple[str, str, float | None, str]]:
    """(stage, device, patches/s, note) of every data stage on `device`."""
    rows = []
    scale, patch, batch = 4, args.patch, args.batch
    gt = torch.rand(batch, 3, patch, patch, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cpu":
        tiles = [encode_png(synthetic_tile(args.tile, seed)) for seed in range(8)]
        counter = iter(range(10**9))

        def crop(with_lq: bool) -> Callable[[], int]:
            def work() -> int:
                index = next(counter)
                crop_row(tiles[index % len(tiles)], row_id=index, epoch=0, seed=0, patch_size=patch, scale=scale,
                         with_lq=with_lq)
                return 1
            return work

        rows.append(("decode + crop", "cpu", rate(crop(False), args.seconds), f"{args.tile} px PNG tile"))
        rows.append(("decode + crop + bicubic LR", "cpu", rate(crop(True), args.seconds), "per row, as a stream task"))
    generator = torch.Generator(device=device).manual_seed(0)
    rows.append(("bicubic LR (batch)", device.type, rate(lambda: _count(make_lq(gt, scale, None, generator)),
                                                        args.seconds), f"batch {batch}"))
    rows.append(("first order (batch)", device.type,
                 rate(lambda: _count(make_lq(gt, scale, FIRST_ORDER, generator)), args.seconds),
                 "blur 0.2-3, noise 1-30, JPEG 30-95"))
    try:
        from gan_core.config import BlindDegradationSection
        from gan_core.data.realesrgan import BlindPairs

        blind = BlindPairs.from_section(BlindDegradationSection(pool_size=0), scale=scale, batch_size=batch, seed=0)
        rows.append(("second order (batch)", device.type, rate(lambda: _count(blind(gt)[0]), args.seconds, 1),
                     "Real-ESRGAN x4plus defaults, no pool"))
    except ImportError as err:
        print(f"second order skipped: {err}")
        rows.append(("second order (batch)", device.type, None, f"skipped: {err}"))
    return rows


def step_rows(args, device: torch.device) -> list[tuple[str, str, float | None, str]]:
    """img/s of the recipe's training step, pixel-only and GAN, at the bench's patch size and batch."""
    from gan_core.build import build_state
    from gan_core.step import train_step

    rows = []
    for phase, pretrain in (("pixel", "total"), ("GAN", "0")):
        steps = 2 + args.steps
        cfg = load_config(args.recipe, [f"data.patch_size={args.patch}", f"data.batch_size={args.batch}",
                                        f"train.total_steps={steps}", "train.d_warmup_steps=0",
                                        f"train.pretrain_steps={steps if pretrain == 'total' else 0}",
                                        "train.compile=false", *args.overrides])
        torch.manual_seed(0)
        state = build_state(cfg, device)
        lq = torch.rand(cfg.data.batch_size, 3, args.patch // cfg.generator.scale, args.patch // cfg.generator.scale,
                        device=device)
        gt = torch.rand(cfg.data.batch_size, 3, args.patch, args.patch, device=device)

        def batches():
            while True:
                yield lq, gt

        source = batches()

        def work() -> int:
            train_step(state, source, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return cfg.data.batch_size

        ips = rate(work, args.seconds, min_calls=args.steps)
        model = f"{cfg.generator.num_feat}f/{cfg.generator.num_block}b"
        rows.append((f"train step, {phase}", device.type, ips, f"{args.recipe.rsplit('/', 1)[-1]} (RRDB {model})"))
    return rows


def _count(tensor: torch.Tensor) -> int:
    if tensor.is_cuda:
        torch.cuda.synchronize()
    return tensor.shape[0]


def main(argv: list[str] | None = None) -> list[tuple[str, str, float | None, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds: small patches, short timings")
    parser.add_argument("--patch", type=int, default=128, help="HR patch side (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="patches per batch (default 16)")
    parser.add_argument("--tile", type=int, default=480, help="side of the PNG tiles decoded (default 480, DIV2K sub-images)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="at least this many training steps per row (default 3)")
    parser.add_argument("--recipe", default="jobs/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides for the training step, key=value")
    args = parser.parse_args(argv)
    if args.quick:
        args.patch, args.batch, args.tile, args.seconds, args.steps = 32, 2, 64, 0.05, 1
        args.overrides = ["generator.num_feat=8", "generator.num_block=1", "generator.num_grow_ch=8",
                          "discriminator.num_feat=8", *args.overrides]
    torch.set_num_threads(1)  # per core
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        rows += data_rows(args, device) + step_rows(args, device)
    print(f"\npatch {args.patch} px (x4), batch {args.batch}, torch {torch.__version__}, 1 CPU thread"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| stage | device | patches/s (CPU: per core) | note |")
    print("|---|---|---|---|")
    for stage, device, value, note in rows:
        print(f"| {stage} | {device} | {'-' if value is None else f'{value:.1f}'} | {note} |")
    by_name = {(stage, device): value for stage, device, value, _ in rows}
    crop = by_name[("decode + crop", "cpu")]
    # CPU seconds per patch of each whole pipeline (decode + crop, then the LR input).
    pipelines = {"bicubic": 1 / by_name[("decode + crop + bicubic LR", "cpu")],
                 "first order": 1 / crop + 1 / by_name[("first order (batch)", "cpu")]}
    if by_name.get(("second order (batch)", "cpu")):
        pipelines["second order"] = 1 / crop + 1 / by_name[("second order (batch)", "cpu")]
    print("\nCPU cores of data work one training process needs to keep its step fed (above 1 on CPU: data-bound):")
    for device in devices:
        for phase in ("pixel", "GAN"):
            step = by_name[(f"train step, {phase}", device.type)]
            needs = ", ".join(f"{name} {step * cost:.2f}" for name, cost in pipelines.items())
            print(f"  {device.type} {phase} step, {step:.1f} img/s: {needs}")
    return rows


if __name__ == "__main__":
    main()
