"""GPU speed of the ESRGAN step and of x4 inference: BasicSR 1.4.2's own step and ours, side by side, in one run.

    python -m bench.gpu_step                      # on a GPU: RRDBNet 23 blocks x 64, batches 16 and 64
    python -m bench.gpu_step --tiny               # anywhere: tiny models, a few steps (the CI smoke run)
    python -m bench.gpu_step --json results.json  # also write every row as JSON

Both sides train the same networks from the same initial weights on the same batches: BasicSR's RRDBNet and
VGG-style discriminator (BatchNorm, 128 px) built by its own arch files, their weights copied into ours, a
random VGG19 (the same one on both sides) for the conv5_4 perceptual loss, ESRGAN's loss weights (L1 1e-2,
perceptual 1, relativistic GAN 5e-3), Adam 1e-4, EMA 0.999. BasicSR's side is `ESRGANModel.optimize_parameters`
from its sdist (bench/basicsr_reference.py), float32, as its recipes run it. Ours is `gan_core.step.train_step`
in each mode below; "--use-gpu" marks the mode `jobs.train --use-gpu` picks (config.GPU_DEFAULTS).

Reported per row: img/s (median of `--repeats` timed windows after the warm-up), the ratio to BasicSR's step on
the same batch, achieved TFLOP/s (the step's FLOPs per image, counted once by torch's FlopCounterMode on our
float32 step, times img/s), and peak GPU memory. Then the numerics: the first step's losses against BasicSR's
(the same maths), bf16 against float32 and compiled against eager over `--check-steps` steps.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.basicsr_reference import esrgan_model, load_basicsr
from gan_core.build import build_state
from gan_core.config import GPU_DEFAULTS, Config, config_from_dict
from gan_core.files import atomic_write
from gan_core.inference import enhance_tensor
from gan_core.losses.perceptual import VGGFeatureLoss
from gan_core.loop import wrap_models
from gan_core.models import build_generator
from gan_core.step import TrainState, train_step


@dataclass(frozen=True)
class Mode:
    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused: bool = False
    cuda_only: bool = False
    whole_graph: bool = False  # the whole train_step captured in one CUDA graph (bench only, see graphed_steps)


MODES = {
    "fp32": Mode("fp32 eager"),
    "bf16": Mode("bf16 + channels_last, eager", bf16=True, channels_last=True, fused=True),
    "compile": Mode("bf16 + channels_last, compile", bf16=True, channels_last=True, compile=True, fused=True),
    "graphs": Mode("bf16 + channels_last, compile + CUDA graphs", bf16=True, channels_last=True, compile=True,
                   compile_mode="reduce-overhead", fused=True, cuda_only=True),
    "step_graph": Mode("bf16 + channels_last, whole step in one CUDA graph (bench only)", bf16=True,
                       channels_last=True, fused=True, cuda_only=True, whole_graph=True),
}
GPU_DEFAULT_MODE = next(key for key, mode in MODES.items() if all(
    getattr(mode, key.split(".")[1]) == value for key, value in GPU_DEFAULTS.items()) and mode.compile_mode == "default")
LOSS_PAIRS = {"l_g_pix": "g/pix", "l_g_percep": "g/percep", "l_g_gan": "g/adv", "l_d_real": "d/real",
              "l_d_fake": "d/fake"}


@dataclass(frozen=True)
class Size:
    num_feat: int
    num_block: int
    num_grow_ch: int
    d_feat: int
    patch: int  # HR patch; BasicSR's VGG-style D takes 128 or 256


FULL = Size(num_feat=64, num_block=23, num_grow_ch=32, d_feat=64, patch=128)
TINY = Size(num_feat=16, num_block=1, num_grow_ch=8, d_feat=8, patch=128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device, *, warmup: int, steps: int, repeats: int) -> float:
    """Median seconds per call over `repeats` windows of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        windows.append((time.perf_counter() - start) / steps)
    return statistics.median(windows)


def make_batches(size: Size, batch: int, device: torch.device, count: int = 4, seed: int = 0) -> list[tuple]:
    """`count` (lq, gt) pairs of smooth random images, the LR by 4x average pooling."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        coarse = torch.rand(batch, 3, size.patch // 8, size.patch // 8, generator=gen)
        gt = torch.nn.functional.interpolate(coarse, size=(size.patch, size.patch), mode="bilinear",
                                             align_corners=False)
        pairs.append((torch.nn.functional.avg_pool2d(gt, 4).to(device), gt.to(device)))
    return pairs


def our_config(size: Size, batch: int, mode: Mode) -> Config:
    return config_from_dict({
        "generator": {"num_feat": size.num_feat, "num_block": size.num_block, "num_grow_ch": size.num_grow_ch,
                      "scale": 4},
        "discriminator": {"name": "vgg", "num_feat": size.d_feat, "norm": "batch", "spectral_norm": False},
        "loss": {"pixel": "l1", "pixel_weight": 1e-2, "perceptual": "none", "perceptual_weight": 1.0,
                 "adversarial": "relativistic", "adversarial_weight": 5e-3},
        "data": {"patch_size": size.patch, "batch_size": batch},
        "train": {"total_steps": 10**6, "pretrain_steps": 0, "ema_decay": 0.999, "bf16": mode.bf16,
                  "channels_last": mode.channels_last, "compile": mode.compile, "compile_mode": mode.compile_mode},
        "optim": {"g_lr": 1e-4, "d_lr": 1e-4, "betas": [0.9, 0.99], "fused": mode.fused},
    })


def our_state(cfg: Config, basicsr_model: Any, device: torch.device) -> TrainState:
    """Our TrainState with BasicSR's initial weights in G, its EMA, D and the VGG19 of the perceptual loss."""
    state = build_state(cfg, device)  # perceptual "none" in cfg: the VGG19 is set here, random, as BasicSR's
    state.generator.load_state_dict(basicsr_model.net_g.state_dict())
    state.generator_ema.load_state_dict(basicsr_model.net_g.state_dict())
    state.discriminator.load_state_dict(basicsr_model.net_d.state_dict())
    perceptual = VGGFeatureLoss(random_backbone=True)
    with torch.no_grad():
        for ours, theirs in zip(perceptual.features.parameters(), basicsr_model.cri_perceptual.vgg.vgg_net.parameters()):
            ours.copy_(theirs)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    state.perceptual = perceptual.to(device, memory_format=memory_format).eval()
    wrap_models(state, cfg)
    return state


def _as(batch: tuple, cfg: Config) -> tuple:
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return tuple(t.contiguous(memory_format=memory_format) for t in batch)


def basicsr_model(basicsr: dict, size: Size, device: torch.device) -> Any:
    """BasicSR's ESRGANModel for `size`, seeded: every call gives the same initial weights."""
    torch.manual_seed(0)
    return esrgan_model(basicsr, num_feat=size.num_feat, num_block=size.num_block, num_grow_ch=size.num_grow_ch,
                        d_feat=size.d_feat, patch=size.patch, device=device)


def basicsr_steps(basicsr: dict, size: Size, batches: list[tuple], device: torch.device):
    """(model, step function) for BasicSR's ESRGAN step cycling through `batches`."""
    model = basicsr_model(basicsr, size, device)
    counter = iter(range(10**9))

    def step() -> dict:
        i = next(counter)
        model.lq, model.gt = batches[i % len(batches)]
        model.optimize_parameters(i + 1)
        return model.log_dict

    return model, step


def our_steps(cfg: Config, basicsr_model: Any, batches: list[tuple], device: torch.device):
    state = our_state(cfg, basicsr_model, device)
    ready = [_as(b, cfg) for b in batches]
    counter = iter(range(10**9))

    def endless():
        while True:
            yield ready[next(counter) % len(ready)]

    stream = endless()
    return state, lambda: train_step(state, stream, cfg)


def graphed_steps(cfg: Config, basicsr_model: Any, batches: list[tuple], device: torch.device):
    """Our whole `train_step` captured in one CUDA graph and replayed, each batch copied into the captured
    inputs first: how fast the step runs when nothing is launched from Python (the issue's reference ran
    BasicSR's step so). Bench only, not a training mode: what the host does in a step (the LR schedule, the EMA
    warm-up, the phase) is frozen at capture, and losses are the captured outputs, overwritten at each replay.
    Adam is made capturable; autocast runs without its cast cache (gan_core.step.autocast)."""
    state = our_state(cfg, basicsr_model, device)
    for optimizer in (state.g_optimizer, state.d_optimizer):
        for group in optimizer.param_groups:
            group["capturable"] = True  # its step counters live on the GPU (set before Adam's state exists)
    static = tuple(t.clone() for t in _as(batches[0], cfg))
    inputs = itertools.repeat(static)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
        for _ in range(3):
            train_step(state, inputs, cfg)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        losses = train_step(state, inputs, cfg)
    ready = [_as(b, cfg) for b in batches]
    counter = iter(range(10**9))

    def step() -> dict:
        lq, gt = ready[next(counter) % len(ready)]
        static[0].copy_(lq)
        static[1].copy_(gt)
        graph.replay()
        return losses

    return state, step


def step_flops(cfg: Config, basicsr_model: Any, batch: tuple, device: torch.device) -> float:
    """FLOPs of one of our float32 GAN steps per image (forward and backward of G, D and the VGG19)."""
    from torch.utils.flop_counter import FlopCounterMode

    state = our_state(cfg, basicsr_model, device)
    stream = iter([_as(batch, cfg)])
    with FlopCounterMode(display=False) as counter:
        train_step(state, stream, cfg)
    return counter.get_total_flops() / batch[0].shape[0]


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_rows(args: argparse.Namespace, basicsr: dict, size: Size, device: torch.device) -> None:
    """Measure and record (`_row`) each path of this workload."""
    for batch in args.batch:
        batches = make_batches(size, batch, device)
        peak_memory_reset(device)
        model, step = basicsr_steps(basicsr, size, batches, device)
        base = batch / timed(step, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
        peak = peak_memory_gib(device)
        flops = step_flops(our_config(size, batch, MODES["fp32"]), model, batches[0], device)
        _row("train", f"batch {batch}", "BasicSR 1.4.2 fp32", base, base, flops, device, peak=peak)
        del model, step
        for key in args.modes:
            mode = MODES[key]
            if mode.cuda_only and device.type != "cuda":
                continue
            # BasicSR's initial weights, built on the CPU: only ours counts in the peak memory
            reference = basicsr_model(basicsr, size, torch.device("cpu"))
            peak_memory_reset(device)
            try:
                make = graphed_steps if mode.whole_graph else our_steps
                _, step = make(our_config(size, batch, mode), reference, batches, device)
                del reference
                warmup = args.warmup + (3 if mode.compile else 0)
                img_s = batch / timed(step, device, warmup=warmup, steps=args.steps, repeats=args.repeats)
            except Exception as err:  # noqa: BLE001 -- one mode failing on this GPU must not cost the others
                _failed("train", f"batch {batch}", f"ours {mode.name}", err)
                continue
            name = f"ours {mode.name}" + (" (--use-gpu)" if key == GPU_DEFAULT_MODE else "")
            _row("train", f"batch {batch}", name, img_s, base, flops, device)
            del step


def inference_rows(args: argparse.Namespace, basicsr: dict, size: Size, device: torch.device) -> None:
    """Measure and record (`_row`) each path of this workload."""
    shapes = [(32, 2)] if args.tiny else [(128, 16), (256, 4)]
    for side, batch in shapes:
        what = f"x4 {side}->{side * 4}, batch {batch}"
        torch.manual_seed(0)
        net = basicsr["archs/rrdbnet_arch"].RRDBNet(3, 3, scale=4, num_feat=size.num_feat, num_block=size.num_block,
                                                    num_grow_ch=size.num_grow_ch).to(device).eval()
        x = torch.rand(batch, 3, side, side, device=device)
        peak_memory_reset(device)
        with torch.inference_mode():
            base = batch / timed(functools.partial(net, x), device, warmup=args.warmup, steps=args.steps,
                                 repeats=args.repeats)
        _row("inference", what, "BasicSR 1.4.2 fp32", base, base, None, device)
        weights = {name: value.cpu() for name, value in net.state_dict().items()}
        del net  # only ours on the device from here: its peak memory is its own
        for key in args.modes:
            mode = MODES[key]
            if mode.cuda_only and device.type != "cuda":
                continue
            peak_memory_reset(device)
            generator = build_generator(**our_config(size, batch, mode).generator.model_dump())
            generator.load_state_dict(weights)
            memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
            generator = generator.to(device, memory_format=memory_format).eval().requires_grad_(False)
            if mode.compile:
                generator = torch.compile(generator, mode=mode.compile_mode)
            xin = x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x
            try:
                img_s = batch / _inference_seconds(generator, xin, mode, args, device)
            except Exception as err:  # noqa: BLE001 -- one mode failing on this GPU must not cost the others
                _failed("inference", what, f"ours {mode.name}", err)
                continue
            _row("inference", what, f"ours {mode.name}", img_s, base, None, device)


def _inference_seconds(generator: torch.nn.Module, x: torch.Tensor, mode: Mode, args: argparse.Namespace,
                       device: torch.device) -> float:
    """Seconds per batch of `gan_core.inference.enhance_tensor` (what jobs.enhance and the pyfunc model run)."""
    with torch.inference_mode():
        return timed(lambda: enhance_tensor(generator, x, 4, bf16=mode.bf16), device,
                     warmup=args.warmup + (3 if mode.compile else 0), steps=args.steps, repeats=args.repeats)


_ROWS: list[dict] = []  # every row measured so far, written to --json as it comes (a run cut short keeps them)
_JSON: list[str] = []


def _save_json(result: dict) -> None:
    if _JSON:
        atomic_write(_JSON[0], lambda f: f.write(json.dumps(result, indent=1).encode()))


def _failed(kind: str, workload: str, name: str, err: Exception) -> None:
    """A mode that failed: printed and kept (with the error) in place of its numbers."""
    what = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"| {workload} | {name} | failed: {what} | | | |", flush=True)
    _ROWS.append({"kind": kind, "workload": workload, "path": name, "error": what})
    _save_json({"rows": _ROWS, "complete": False})


def _row(kind: str, workload: str, name: str, img_s: float, base: float, flops: float | None,
         device: torch.device, peak: float | None = None) -> dict:
    row = {"kind": kind, "workload": workload, "path": name, "img_s": img_s, "ratio": img_s / base,
           "tflops": flops * img_s / 1e12 if flops else None,
           "peak_gib": peak if peak is not None else peak_memory_gib(device)}
    tflops = "-" if row["tflops"] is None else f"{row['tflops']:.2f}"
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
    print(f"| {workload} | {name} | {img_s:.1f} | {row['ratio']:.2f}x | {tflops} | {peak} |", flush=True)
    _ROWS.append(row)
    _save_json({"rows": _ROWS, "complete": False})
    return row


def numerics(args: argparse.Namespace, basicsr: dict, size: Size, device: torch.device) -> dict:
    """The first step against BasicSR's; bf16 and compiled against float32 eager over `--check-steps` steps."""
    batch = args.batch[0]
    batches = make_batches(size, batch, device)
    model, step = basicsr_steps(basicsr, size, batches, device)
    reference = basicsr_model(basicsr, size, device)
    _, ours = our_steps(our_config(size, batch, MODES["fp32"]), reference, batches, device)
    theirs, mine = step(), {k: float(v) for k, v in ours().items()}
    first = {key: abs(mine[ours_key] / theirs[key] - 1) for key, ours_key in LOSS_PAIRS.items()}
    result = {"first_step_rel_diff_vs_basicsr": first}
    print("first step, ours fp32 vs BasicSR's (relative difference): "
          + ", ".join(f"{k} {v:.1e}" for k, v in first.items()), flush=True)
    runs = {}
    for key in ("fp32", "bf16", "compile"):
        if key != "fp32" and key not in args.modes:
            continue
        reference = basicsr_model(basicsr, size, device)
        _, run = our_steps(our_config(size, batch, MODES[key]), reference, batches, device)
        history = [run() for _ in range(args.check_steps)]
        runs[key] = {k: [float(h[k]) for h in history] for k in LOSS_PAIRS.values()}
    for key in runs.keys() - {"fp32"}:
        diffs = {k: abs(statistics.fmean(runs[key][k]) / statistics.fmean(runs["fp32"][k]) - 1) for k in runs[key]}
        result[f"{key}_vs_fp32_mean_rel_diff"] = diffs
        print(f"{MODES[key].name} vs fp32 eager, loss means over {args.check_steps} steps (relative difference): "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="1-block 16-feature G, batch 2, a few steps: a smoke run")
    parser.add_argument("--batch", type=int, nargs="+", help="training batch sizes (default 16 64; tiny: 2)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES),
                        help="our modes to time (default: all the device runs; tiny on the CPU: fp32 bf16)")
    parser.add_argument("--steps", type=int, help="steps per timed window (default 20; tiny 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; tiny 1); compiled modes +3")
    parser.add_argument("--check-steps", type=int, help="steps of the bf16 / compile numerics check (200; tiny 3)")
    parser.add_argument("--skip-numerics", action="store_true")
    parser.add_argument("--json", help="write the rows and the numerics here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    args.batch = args.batch or ([2] if tiny else [16, 64])
    args.modes = args.modes or (["fp32", "bf16"] if tiny and device.type == "cpu" else list(MODES))
    args.steps = args.steps or (2 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    args.check_steps = args.check_steps or (3 if tiny else 200)
    size = TINY if tiny else FULL
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    basicsr = load_basicsr()
    _ROWS.clear()
    _JSON[:] = [args.json] if args.json else []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, RRDBNet {size.num_block}x{size.num_feat}, "
          f"{size.patch} px HR, {time.strftime('%Y-%m-%d')}", flush=True)
    print("| workload | path | img/s | vs BasicSR | TFLOP/s | peak GiB |\n|---|---|---|---|---|---|", flush=True)
    train_rows(args, basicsr, size, device)
    inference_rows(args, basicsr, size, device)
    result = {"device": name, "torch": torch.__version__, "size": size.__dict__, "rows": list(_ROWS),
              "complete": False}
    if not args.skip_numerics:
        result["numerics"] = numerics(args, basicsr, size, device)
    result["complete"] = True
    _save_json(result)
    return result


if __name__ == "__main__":
    main()
