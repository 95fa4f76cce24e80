"""The training loop of one worker: cadence (log, validate, checkpoint), means over workers, progress.

Plain PyTorch. Under DDP (torch.distributed initialised by the caller, e.g. Ray Train) the loop
all-reduces what it logs and what it validates, so every worker reads the same numbers; with one
process it needs nothing else. What happens around the loop comes in as `Hooks`: `jobs/` hands Ray
Train's report and MLflow logging in; a test or a benchmark hands in nothing.

    state = setup_state(cfg, device)
    sampler = make_sampler(cfg, images)
    metrics = fit(state, device_batches(sampler, device, cfg), cfg,
                  Hooks(validate=validator(state, val_images, cfg, device)))

With `data.blind` (Real-ESRGAN's degradation) the sampler yields GT patches only and the LR is made on
the device: `device_batches(sampler, device, cfg, blind=make_blind(cfg, rank))`, and the checkpoint hook
saves the stage's state with the sampler's (`checkpointer(..., blind=blind)`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gan_core.build import build_state
from gan_core.checkpoint import load_checkpoint, load_sampler_state, save_checkpoint, save_sampler_state
from gan_core.config import Config
from gan_core.data import PatchSampler
from gan_core.data.realesrgan import BlindPairs
from gan_core.manifest import checkpoint_problem, write_manifest
from gan_core.schedules import set_base_lr
from gan_core.scoring import evaluate_images, load_eval_images, load_lpips, mean_metrics, sample_grid
from gan_core.tasks import build_task
from gan_core.step import TrainState, phase, train_step, unwrap

Batch = tuple[torch.Tensor, torch.Tensor]
SourceBatch = tuple[torch.Tensor | None, torch.Tensor]  # lq is None when the LR is made on the device (data.blind)


class NonFiniteLossError(FloatingPointError):
    """A loss became inf or nan. Every worker raises it at the same step (the check reads all-reduced
    means), and it is deterministic: restarting from the last checkpoint would only repeat it."""


def _ignore(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What the loop hands to its caller. Every hook is optional.

    Attributes:
        validate: returns the validation metrics (the same on every worker); called every
            `train.val_every` steps and whenever a checkpoint is due.
        checkpoint: writes a checkpoint folder and returns it; called when one is due.
        report: gets each validation's metrics (with `step`) and the checkpoint folder or None;
            the folder is removed once it returns (Ray Train copies it to its storage).
        log: gets the window means (and `perf/img_per_s`) every `train.log_every` steps, and each
            validation's metrics, with the step.
    """

    validate: Callable[[], dict[str, float]] = dict
    checkpoint: Callable[[], Path | None] = _ignore
    report: Callable[[dict[str, float], Path | None], None] = _ignore
    log: Callable[[dict[str, float], int], None] = _ignore


# -- set-up ---------------------------------------------------------------------------------------


def setup_state(cfg: Config, device: torch.device) -> TrainState:
    """Threads, seed and a fresh TrainState. The same seed on every worker gives the same initial
    weights everywhere (DDP also broadcasts rank 0's)."""
    if cfg.train.threads_per_worker and device.type == "cpu":
        torch.set_num_threads(cfg.train.threads_per_worker)
    torch.manual_seed(cfg.train.seed)
    return build_state(cfg, device)


def restore(state: TrainState, directory: str | Path, cfg: Config, rank: int = 0, world_size: int | None = None,
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Continue from a checkpoint folder: models, optimizers, RNG, this worker's sampler position.

    The config wins over the optimizer state in the checkpoint: a resume with `optim.g_lr=...`, or a PBT
    exploit (a donor's checkpoint with mutated learning rates), trains with the learning rates asked for.

    Args:
        world_size: the size of the group that resumes. When the checkpoint was written by a group of another
            size (an elastic run that shrank or grew), the data shards were split anew: a sampler position
            describes another shard, so none is returned and the caller starts fresh samplers
            (`resized_data_seed`).

    Returns:
        (the checkpoint's `extra`, this worker's sampler state or None).
    """
    problem = checkpoint_problem(directory)
    if problem is not None:  # e.g. a sweep's copy of a trial checkpoint cut short: say so, not an EOFError
        raise ValueError(f"cannot resume from {directory}: the checkpoint is incomplete ({problem})")
    extra = load_checkpoint(directory, state)
    set_base_lr(state.g_optimizer, state.g_scheduler, cfg.optim.g_lr)
    if state.d_optimizer is not None:
        set_base_lr(state.d_optimizer, state.d_scheduler, cfg.optim.d_lr)
    if world_size is not None and checkpoint_world_size(directory) not in (None, world_size):
        return extra, None
    return extra, load_sampler_state(directory, rank)


def checkpoint_world_size(directory: str | Path) -> int | None:
    """How many workers wrote the checkpoint folder (rank 0's manifest), None when it does not say."""
    manifest = Path(directory) / "manifest.json"
    if not manifest.is_file():
        return None
    size = json.loads(manifest.read_text()).get("world_size")
    return size if type(size) is int else None


def resized_data_seed(seed: int, step: int) -> int:
    """The data seed of a worker group that resumed at `step` with another size than the checkpoint's: the
    samplers start afresh, and a seed that depends on the step keeps them from replaying step 0's patches."""
    return seed * 1_000_003 + step


def per_worker_batch(global_batch: int, rank: int, world_size: int) -> int:
    """This worker's share of a global batch held constant while the group resizes: an even split, the first
    `global_batch % world_size` ranks taking one patch more.

    Raises:
        ValueError: fewer patches than workers.
    """
    if global_batch < world_size:
        raise ValueError(f"a global batch of {global_batch} cannot be split over {world_size} workers")
    return global_batch // world_size + (1 if rank < global_batch % world_size else 0)


def wrap_models(state: TrainState, cfg: Config, wrap_generator: Callable[[nn.Module], nn.Module] = lambda m: m,
                wrap_discriminator: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
    """Wrap G and D (separately, e.g. for DDP), then compile them when `train.compile` asks."""
    state.generator = wrap_generator(state.generator)
    if state.discriminator is not None:
        state.discriminator = wrap_discriminator(state.discriminator)
    if not cfg.train.compile:
        return
    mode = compile_mode(cfg, next(unwrap(state.generator).parameters()).device)
    state.generator = torch.compile(state.generator, mode=mode)
    if state.discriminator is not None and (cfg.loss.gp_weight > 0 or cfg.loss.r1_weight > 0):
        # aot_autograd has no double backward, which the gradient penalty and R1 need.
        print("train.compile: D stays eager because loss.gp_weight / loss.r1_weight need double backward", flush=True)
    elif state.discriminator is not None:
        state.discriminator = torch.compile(state.discriminator, mode=mode)


def compile_mode(cfg: Config, device: torch.device) -> str:
    """`train.compile_mode`, less the CUDA graphs where there is no CUDA device to replay them on."""
    if device.type != "cuda" and cfg.train.compile_mode in ("reduce-overhead", "max-autotune"):
        return "default" if cfg.train.compile_mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return cfg.train.compile_mode


def make_sampler(cfg: Config, images: list, *, rank: int = 0, sources: list[str] | None = None,
                 sampler_state: dict[str, Any] | None = None, seed: int | None = None) -> PatchSampler:
    """The patch sampler of one worker; with `data.sampling: source`, every source photo equally often.

    Args:
        cfg: the run config (patch size, batch, augmentations, degradation, seed).
        images: this worker's HR images (arrays or (name, array) pairs).
        rank: this worker's rank: workers draw different patches.
        sources: the source photo of each image (needed for `data.sampling: source`).
        sampler_state: a saved position to continue from.
        seed: the data seed (default train.seed; `resized_data_seed` after an elastic resize).
    """
    data = cfg.data
    # The task makes each (lq, gt) batch from the patches (images, or pairs of input and target); blind SR makes
    # its LR later, on the device.
    sampler = PatchSampler(
        images, patch_size=data.patch_size, scale=cfg.generator.scale, batch_size=data.batch_size,
        seed=cfg.train.seed if seed is None else seed, rank=rank, hflip=data.hflip, rot90=data.rot90, color_jitter=data.color_jitter,
        make_pair=None if data.blind is not None else build_task(cfg).train_pair,
        groups=sources if data.sampling == "source" else None, gt_only=data.blind is not None,
    )
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    return sampler


def make_blind(cfg: Config, rank: int = 0, sampler_state: dict[str, Any] | None = None,
               seed: int | None = None) -> BlindPairs | None:
    """The device-side degradation stage of `data.blind` (None without it), seeded per rank.

    Args:
        sampler_state: this worker's saved sampler state; its `blind` entry (written by `checkpointer`)
            continues the degradation and the pair pool where they were.
        seed: as make_sampler's.
    """
    if cfg.data.blind is None:
        return None
    blind = BlindPairs.from_section(cfg.data.blind, scale=cfg.generator.scale, batch_size=cfg.data.batch_size,
                                    seed=cfg.train.seed if seed is None else seed, rank=rank)
    if sampler_state is not None and sampler_state.get("blind") is not None:
        blind.load_state_dict(sampler_state["blind"])
    return blind


def device_batches(batches: Iterable[SourceBatch], device: torch.device, cfg: Config,
                   blind: BlindPairs | None = None) -> Iterator[Batch]:
    """The batches on `device`, channels_last when the config asks for it.

    Args:
        batches: (lq, gt) batches, or (None, gt) when `blind` makes the LR.
        blind: the device-side degradation (`make_blind`): the GT moves to the device, then the LR is made
            there (and pairs go through the pool).
    """
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for lq, gt in batches:
        if blind is not None:
            lq, gt = blind(gt.to(device, non_blocking=True))
        yield (lq.to(device, memory_format=memory_format, non_blocking=True),
               gt.to(device, memory_format=memory_format, non_blocking=True))


def load_validation_images(cfg: Config) -> list[np.ndarray]:
    """The validation examples of `data.val` (images, shards, or a paired folder in the task's layout), at most
    `data.max_val_images`, cropped to `data.val_crop`.

    Raises:
        FileNotFoundError: data.val is missing or holds no readable image.
    """
    try:
        named = load_eval_images(cfg.data.val, cfg.data.max_val_images, cfg.data.val_crop, task=cfg.task.name)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.val: {err} (run `python -m jobs.prepare_data --demo` for the demo)") from None
    return [img for _, img in named]


def validation_lpips(device: torch.device, announce: bool) -> nn.Module | None:
    """LPIPS (AlexNet) for validation when its backbone weights are on this machine, else None."""
    lpips, why = load_lpips()
    if lpips is None and announce:
        print(f"validation without LPIPS: {why}", flush=True)
    return lpips.to(device) if lpips is not None else None


# -- the standard hooks ------------------------------------------------------------------------------


def validator(state: TrainState, images: list[np.ndarray], cfg: Config, device: torch.device, *,
              lpips: nn.Module | None = None, rank: int = 0, world_size: int = 1,
              on_sample: Callable[[np.ndarray, int], None] | None = None) -> Callable[[], dict[str, float]]:
    """The `validate` hook: each worker scores its slice of `images`, the sums are all-reduced.

    Args:
        on_sample: gets a sample grid (LR | output | HR of the first image) and the step at each validation.

    Returns:
        A function returning `val/<metric>` means over all images (the EMA generator when there is one).
    """
    mine = images[rank::world_size]
    # The task makes each validation pair (a blind run: the photos degraded by data.blind, seeded per image) and
    # scores it with its own metrics and baseline.
    task = build_task(cfg)

    def validate() -> dict[str, float]:
        model = state.generator_ema or unwrap(state.generator)
        was_training = model.training
        model.eval()
        sums = evaluate_images(model, mine, cfg.generator.scale, device, lpips=lpips, bf16=cfg.train.bf16, task=task)
        sums = _sum_over_workers(sums, device)
        if on_sample is not None:
            on_sample(sample_grid(model, images[0], cfg.generator.scale, device, task=task), state.step)
        model.train(was_training)
        return {f"val/{key}": value for key, value in mean_metrics(sums).items()}

    return validate


def checkpointer(state: TrainState, cfg: Config, sampler: PatchSampler | None, *, rank: int = 0,
                 world_size: int | None = None, extra: dict[str, Any] | None = None,
                 blind: BlindPairs | None = None) -> Callable[[], Path]:
    """The `checkpoint` hook: a fresh temporary folder with the full checkpoint (written by rank 0), this
    worker's sampler position and, written last, this worker's manifest of both (`write_manifest`). The
    loop removes the folder after `report`.

    Ray Train copies every worker's folder into one storage folder, in no order we control; the manifests
    (rank 0's names the world size) let a reader tell a complete copy from one cut short
    (`gan_core.manifest.latest_complete_checkpoint`).

    Args:
        world_size: how many workers write into each checkpoint; by default the size of the initialised
            torch.distributed group (1 without one).
        blind: the device-side degradation stage; its state (generators, pair pool) goes into this worker's
            sampler file under `blind`, so a resumed run draws the same degradations.
    """

    def write() -> Path:
        workers = world_size or (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        directory = Path(tempfile.mkdtemp(prefix="gan-ckpt-"))
        written = []
        if rank == 0:
            written.append(save_checkpoint(directory, state, cfg, extra=extra))
        if sampler is not None:
            sampler_state = sampler.state_dict()
            if blind is not None:
                sampler_state["blind"] = blind.state_dict()
            written.append(save_sampler_state(directory, rank, sampler_state))
        write_manifest(directory, written, rank=rank, world_size=workers)
        return directory

    return write


# -- the loop -----------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Loss sums of the steps since the last log line, kept on the device (no host sync per step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double()
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1


def fit(state: TrainState, batches: Iterator[Batch], cfg: Config, hooks: Hooks = Hooks(), *,
        rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Train `state` to `train.total_steps`.

    Every `train.log_every` steps (and before every validation) the window's loss means are averaged over
    all workers, checked for inf/nan and handed to `hooks.log`; rank 0 prints a progress line. Every
    `train.val_every` steps, and whenever a checkpoint is due (`train.ckpt_every`, the last step), it
    validates and reports, with a checkpoint when one is due.

    Args:
        state: models and optimizers (restored or fresh, wrapped as the caller wants).
        batches: an endless iterator of (lq, gt) on the models' device.
        cfg: the run config.
        hooks: see `Hooks`.
        rank, world_size: this worker's place in the DDP group (1 without DDP).

    Returns:
        The last validation's metrics (with `step` and `perf/img_per_s`); {} when none ran.

    Raises:
        NonFiniteLossError: a logged loss mean is inf or nan (raised on every worker at the same step).
    """
    total, train_cfg = cfg.train.total_steps, cfg.train
    device = next(unwrap(state.generator).parameters()).device
    window, first_step, run_start = _Window(), state.step, time.perf_counter()
    img_per_s, last = 0.0, {}
    while state.step < total:
        window.add(train_step(state, batches, cfg))
        step = state.step
        checkpoint_due = step % train_cfg.ckpt_every == 0 or step == total
        validation_due = checkpoint_due or step % train_cfg.val_every == 0
        if step % train_cfg.log_every == 0 or validation_due:
            elapsed = time.perf_counter() - window.start
            img_per_s = window.steps * cfg.data.batch_size * world_size / max(elapsed, 1e-9)
            means = _window_means(window, device)
            _check_finite(means, step)
            if rank == 0:
                _progress(step, cfg, means, img_per_s, (time.perf_counter() - run_start) / (step - first_step))
            hooks.log(means | {"perf/img_per_s": img_per_s}, step)
            window = _Window()
        if validation_due:
            last = hooks.validate() | {"step": step, "perf/img_per_s": img_per_s}
            hooks.log({k: v for k, v in last.items() if k != "step"}, step)
            if rank == 0:
                _print_validation(step, last)
            directory = hooks.checkpoint() if checkpoint_due else None
            try:
                hooks.report(last, directory)
            finally:
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
    return last


def _sum_over_workers(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    tensor = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def _window_means(window: _Window, device: torch.device) -> dict[str, float]:
    """Means over every worker's steps: each worker trains on its own shard, so rank 0's losses alone
    describe only its part of the data. One small all-reduce per log line; D losses exist only in GAN
    steps, which may start mid-window, hence a count per key."""
    keys = sorted(window.sums)
    if not keys:
        return {}
    stats = torch.stack([torch.stack([window.sums[k].to(device), torch.tensor(float(window.counts[k]),
                                      dtype=torch.float64, device=device)]) for k in keys])  # (K, 2)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return {k: total / count for k, (total, count) in zip(keys, stats.tolist())}


def _print_validation(step: int, metrics: dict[str, float]) -> None:
    """One line: the output's main metric, its baseline's and the gain (SR, denoise, lowlight: PSNR-Y; fusion: Q^AB/F)."""
    for metric, unit, baselines in (("psnr_y", " dB", ("bicubic", "input")), ("qabf", "", ("average",))):
        for baseline in baselines:
            if f"val/{metric}" in metrics and f"val/{baseline}_{metric}" in metrics:
                value, base = metrics[f"val/{metric}"], metrics[f"val/{baseline}_{metric}"]
                extra = f", SSIM-Y {metrics['val/ssim_y']:.4f}" if "val/ssim_y" in metrics else ""
                print(f"[val] step {step}: {metric.upper().replace('_Y', '-Y')} {value:.4f}{unit} ({baseline} {base:.4f}, "
                      f"gain {value - base:+.4f}){extra}", flush=True)
                return


def _check_finite(means: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteLossError(
            f"non-finite loss by step {step} ({shown}): lower the learning rates (optim.g_lr / optim.d_lr), "
            "set optim.grad_clip, or turn train.bf16 off")


def _progress(step: int, cfg: Config, means: dict[str, float], img_per_s: float, seconds_per_step: float) -> None:
    eta = seconds_per_step * (cfg.train.total_steps - step)
    shown = " ".join(f"{k} {v:.4g}" for k, v in means.items() if k.startswith(("g/", "d/")) and "logit" not in k)
    print(f"step {step}/{cfg.train.total_steps} [{phase(step - 1, cfg)}] {img_per_s:.1f} img/s {shown} "
          f"lr {means.get('lr/g', 0):.2e} ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
