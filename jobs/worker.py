"""What one training worker does, with the Ray calls passed in (so jobs.train and jobs.tune share it).

The numbered distributed steps live in `jobs.train.train_loop_per_worker`; this file holds the
plain-PyTorch side: threads and seeds, data, validation reduced over workers, progress, MLflow from
rank 0, checkpoint directories.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gan_core.build import build_state
from gan_core.checkpoint import load_checkpoint, save_checkpoint
from gan_core.config import Config
from gan_core.data import ImageDecodeError, PatchSampler, decode_image, load_image, load_shard_images
from gan_core.data.images import IMAGE_EXTENSIONS
from gan_core.evaluation import center_crop, evaluate_images, mean_metrics, sample_grid
from gan_core.losses import LPIPS
from gan_core.schedules import set_base_lr
from gan_core.step import phase, train_step, unwrap
from gan_core.weights import MissingWeightsError

Report = Callable[[dict[str, float], "Path | None"], None]


def load_validation_images(cfg: Config) -> list[tuple[str, np.ndarray]]:
    """Validation HR images from `data.val` (a folder of images or of Parquet shards), centre-cropped."""
    root = Path(cfg.data.val)
    if not root.exists():
        raise FileNotFoundError(f"data.val={root} does not exist (run `python -m jobs.prepare_data --demo` for the demo)")
    if any(root.glob("*.parquet")):
        named = load_shard_images(root)
    else:
        named = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                named.append((path.name, load_image(path)))
            except ImageDecodeError as err:
                print(f"skipping validation image: {err}", file=sys.stderr)
    named = named[: cfg.data.max_val_images]
    if not named:
        raise FileNotFoundError(f"data.val={root} holds no readable images")
    return [(name, center_crop(img, cfg.data.val_crop)) for name, img in named]


class TrainingWorker:
    """State and loop of one DDP worker."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device,
                 tracking_uri: str | None = None, run_id: str | None = None):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        if cfg.train.threads_per_worker and device.type == "cpu":
            torch.set_num_threads(cfg.train.threads_per_worker)
        torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
        self.state = build_state(cfg, device)
        self.sampler_state: dict | None = None
        self.skipped_images: list[str] = []
        self.logger = None
        if rank == 0 and tracking_uri and run_id:
            from jobs.tracking import RunLogger

            self.logger = RunLogger(tracking_uri, run_id)
        self.val_images = load_validation_images(cfg)
        self.lpips = _lpips_metric(device, announce=rank == 0)
        self.extra: dict = {"mlflow_run_id": run_id or ""}

    # -- setup ---------------------------------------------------------------

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint directory written by `write_checkpoint`."""
        run_id = self.extra.get("mlflow_run_id")
        self.extra = load_checkpoint(directory, self.state)
        if run_id:  # after a PBT exploit the checkpoint is a donor's; what this run writes belongs to this run
            self.extra["mlflow_run_id"] = run_id
        # The config wins over the optimizer state in the checkpoint: a resume with optim.g_lr=... or a
        # PBT exploit (donor checkpoint + mutated learning rates) trains with the LRs asked for.
        set_base_lr(self.state.g_optimizer, self.state.g_scheduler, self.cfg.optim.g_lr)
        if self.state.d_optimizer is not None:
            set_base_lr(self.state.d_optimizer, self.state.d_scheduler, self.cfg.optim.d_lr)
        sampler_file = directory / f"sampler_rank{self.rank}.pt"
        if sampler_file.is_file():
            self.sampler_state = torch.load(sampler_file, weights_only=True)
        if self.rank == 0:
            print(f"restored step {self.state.step} from {directory}", flush=True)

    def wrap_models(self, wrap_generator: Callable, wrap_discriminator: Callable) -> None:
        """DDP-wrap G and D (separately), then optionally compile them."""
        state = self.state
        state.generator = wrap_generator(state.generator)
        if state.discriminator is not None:
            state.discriminator = wrap_discriminator(state.discriminator)
        if self.cfg.train.compile:
            state.generator = torch.compile(state.generator)
            penalties = self.cfg.loss.gp_weight > 0 or self.cfg.loss.r1_weight > 0
            if state.discriminator is not None and penalties:
                # aot_autograd has no double backward, which the gradient penalty and R1 need.
                print("train.compile: D stays eager because loss.gp_weight / loss.r1_weight need double backward",
                      flush=True)
            elif state.discriminator is not None:
                state.discriminator = torch.compile(state.discriminator)

    def load_train_images(self, rows: Iterable[tuple[bytes, str | None]]) -> None:
        """Decode this worker's shard once (rows of encoded image, source photo); undecodable rows are skipped
        and counted. With data.sampling=source, every source photo is drawn equally often."""
        images, sources = [], []
        for index, (data, source) in enumerate(rows):
            try:
                images.append(decode_image(data, name=f"row {index}"))
                sources.append(source)
            except ImageDecodeError as err:
                self.skipped_images.append(str(err))
        if not images:
            raise RuntimeError(f"worker {self.rank} received no decodable training images")
        cfg = self.cfg
        self.sampler = PatchSampler(
            images, patch_size=cfg.data.patch_size, scale=cfg.generator.scale, batch_size=cfg.data.batch_size,
            seed=cfg.train.seed + 1000 * self.rank, hflip=cfg.data.hflip, rot90=cfg.data.rot90,
            color_jitter=cfg.data.color_jitter, degradation=cfg.data.degradation.model_dump(),
            groups=sources if cfg.data.sampling == "source" else None,
        )
        if self.sampler_state is not None:
            self.sampler.load_state_dict(self.sampler_state)
        if self.skipped_images and self.rank == 0:
            print(f"skipped {len(self.skipped_images)} undecodable training rows: {self.skipped_images[:3]}", flush=True)
        photos = f" from {len(set(sources))} source photos" if cfg.data.sampling == "source" else ""
        print(f"worker {self.rank}: {len(images)} training images{photos}, {len(self.sampler.skipped)} smaller than "
              "a patch", flush=True)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        for lq, gt in self.sampler:
            yield (lq.to(self.device, memory_format=memory_format, non_blocking=True),
                   gt.to(self.device, memory_format=memory_format, non_blocking=True))

    # -- validation and checkpoints -------------------------------------------

    def validate(self) -> dict[str, float]:
        """Each worker scores its slice of the validation images; the sums are all-reduced."""
        model = self.state.generator_ema or unwrap(self.state.generator)
        was_training = model.training
        model.eval()
        mine = [img for _, img in self.val_images[self.rank :: self.world_size]]
        sums = evaluate_images(model, mine, self.cfg.generator.scale, self.device, lpips=self.lpips,
                               bf16=self.cfg.train.bf16)
        model.train(was_training)
        keys = sorted(sums)
        if dist.is_available() and dist.is_initialized():
            tensor = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor)
            sums = dict(zip(keys, tensor.tolist()))
        if self.logger is not None:
            _, first = self.val_images[0]
            self.logger.image(sample_grid(model, first, self.cfg.generator.scale, self.device),
                              f"samples/step_{self.state.step:07d}.png")
        return {f"val/{k}": v for k, v in mean_metrics(sums).items()}

    def write_checkpoint(self) -> Path:
        """A fresh directory with the full checkpoint (rank 0) and this worker's sampler position."""
        directory = Path(tempfile.mkdtemp(prefix="gan-ckpt-"))
        if self.rank == 0:
            save_checkpoint(directory, self.state, self.cfg, extra=self.extra)
        torch.save(self.sampler.state_dict(), directory / f"sampler_rank{self.rank}.pt")
        return directory

    # -- the loop -------------------------------------------------------------

    def run(self, report: Report) -> None:
        """Train to `train.total_steps`, reporting at each validation (with a checkpoint when due)."""
        cfg, state = self.cfg, self.state
        total, batches = cfg.train.total_steps, self.batches()
        # Sums and counts per key: D losses exist only in GAN steps, which may start mid-window.
        window: dict[str, list[float]] = {}
        window_steps, window_start, run_start, first_step = 0, time.perf_counter(), time.perf_counter(), state.step
        img_per_s = 0.0
        while state.step < total:
            losses = train_step(state, batches, cfg)
            _check_finite(losses, state.step)
            for key, value in losses.items():
                entry = window.setdefault(key, [0.0, 0])
                entry[0] += float(value)
                entry[1] += 1
            window_steps += 1
            step = state.step
            if step % cfg.train.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                img_per_s = window_steps * cfg.data.batch_size * self.world_size / max(elapsed, 1e-9)
                means = self._mean_over_workers(window)
                self._progress(step, means, img_per_s, run_start, first_step)
                if self.logger is not None:
                    self.logger.metrics(means | {"perf/img_per_s": img_per_s}, step)
                window, window_steps, window_start = {}, 0, time.perf_counter()
            checkpoint_due = step % cfg.train.ckpt_every == 0 or step == total
            if step % cfg.train.val_every == 0 or checkpoint_due:
                metrics = self.validate() | {"step": step, "perf/img_per_s": img_per_s}
                if self.logger is not None:
                    self.logger.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                    print(f"[val] step {step}: PSNR-Y {metrics['val/psnr_y']:.3f} dB "
                          f"(bicubic {metrics['val/bicubic_psnr_y']:.3f}, gain {metrics['val/gain_psnr_y']:+.3f}), "
                          f"SSIM-Y {metrics['val/ssim_y']:.4f}", flush=True)
                directory = self.write_checkpoint() if checkpoint_due else None
                report(metrics, directory)
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
        if self.logger is not None and self.logger.failures:
            print(f"!! {self.logger.failures} MLflow logging call(s) failed during this run; see the messages above",
                  file=sys.stderr, flush=True)

    def _mean_over_workers(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Window means over every worker's steps (each worker trains on its own shard, so rank 0's
        losses alone describe only its half of the data). One small all-reduce per log line."""
        keys = sorted(window)
        if dist.is_available() and dist.is_initialized():
            stats = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=self.device)  # (K, 2)
            dist.all_reduce(stats)
            window = dict(zip(keys, stats.tolist()))
        return {k: total / count for k, (total, count) in window.items()}

    def _progress(self, step: int, means: dict[str, float], img_per_s: float, run_start: float, first_step: int) -> None:
        if self.rank != 0:
            return
        total = self.cfg.train.total_steps
        per_step = (time.perf_counter() - run_start) / max(1, step - first_step)
        eta = per_step * (total - step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in means.items() if k.startswith(("g/", "d/")) and "logit" not in k)
        print(f"step {step}/{total} [{phase(step - 1, self.cfg)}] {img_per_s:.1f} img/s {shown} "
              f"lr {means.get('lr/g', 0):.2e} ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)


def _lpips_metric(device: torch.device, announce: bool) -> torch.nn.Module | None:
    """LPIPS (AlexNet) for validation when its backbone weights are on this machine, else None."""
    try:
        return LPIPS(net="alex").to(device)
    except MissingWeightsError as err:
        if announce:
            print(f"validation without LPIPS: {str(err).splitlines()[0]}", flush=True)
        return None


def _check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        raise FloatingPointError(
            f"non-finite loss at step {step}: {bad}. Lower the learning rates (optim.g_lr / optim.d_lr), "
            "set optim.grad_clip, or check the data; the run can be resumed from its last checkpoint."
        )
