"""Training throughput: a plain single-process loop against Ray Train DDP, in one run.

    python -m bench.train_throughput [--steps 60] [--recipe jobs/configs/demo.yaml] [key=value ...]
    python -m bench.train_throughput --use-gpu --workers 1 --recipe jobs/configs/esrgan_x4_gan.yaml

Same recipe, same global batch (the plain loop uses num_workers x data.batch_size and all cores;
each DDP worker one core). Steady-state img/s excludes start-up, which is reported apart.
With --use-gpu both sides run on the GPU with `jobs.train --use-gpu`'s settings (config.GPU_DEFAULTS):
the plain loop on `cuda`, jobs.train with `--use-gpu` (one GPU per worker, nccl).
Ratios, not absolute numbers, are what compare across machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from gan_core.config import load_config
from gan_core.data import load_shard_images
from gan_core.loop import Hooks, device_batches, fit, make_sampler, setup_state, wrap_models


def plain_loop(recipe: str, overrides: list[str], steps: int, global_batch: int, threads: int,
               use_gpu: bool = False) -> float:
    """Steady img/s of `gan_core.loop.fit` in this process (the median of its log windows after the first)."""
    cfg = load_config(recipe, overrides + [f"data.batch_size={global_batch}", "train.log_every=10",
                                           f"train.val_every={steps + 5}", f"train.ckpt_every={steps + 5}",
                                           f"train.threads_per_worker={threads}"], use_gpu=use_gpu)
    device = torch.device("cuda" if use_gpu else "cpu")
    state = setup_state(cfg, device)
    wrap_models(state, cfg)
    sampler = make_sampler(cfg, [img for _, img in load_shard_images(cfg.data.train)])
    windows: list[float] = []
    fit(state, device_batches(sampler, device, cfg), cfg,
        Hooks(log=lambda means, step: windows.append(means["perf/img_per_s"])))
    return statistics.median(windows[1:] or windows)


def ray_train(recipe: str, overrides: list[str], steps: int, workers: int, use_gpu: bool = False,
              ) -> tuple[float, float]:
    """(steady img/s, wall seconds) of jobs.train with `workers` DDP workers."""
    from mlflow.tracking import MlflowClient

    from jobs import train

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        start = time.perf_counter()
        train.main(["--config", recipe, "--num-workers", str(workers), "--name", f"bench-{workers}w",
                    *(["--use-gpu"] if use_gpu else []),
                    "--tracking-uri", uri, *overrides, f"run.storage_path={tmp}/results",
                    "train.threads_per_worker=1", "train.log_every=10", f"train.val_every={steps + 5}",
                    f"train.ckpt_every={steps + 5}"])
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name(load_config(recipe).run.experiment).experiment_id])[0]
        windows = [m.value for m in client.get_metric_history(run.info.run_id, "perf/img_per_s")]
    return statistics.median(windows[1:] or windows), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="jobs/configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true", help="both sides on the GPU, with --use-gpu's settings")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.use_gpu and not torch.cuda.is_available():
        parser.error("--use-gpu: this machine has no CUDA device")
    cfg = load_config(args.recipe, args.overrides)
    steps = args.steps
    # Pixel-only steps: the phase a demo spends most of its time in.
    overrides = args.overrides + [f"train.total_steps={steps + 5}", f"train.pretrain_steps={steps + 5}"]
    global_batch = cfg.data.batch_size * args.workers
    cores = os.cpu_count() or 1
    plain = plain_loop(args.recipe, overrides, steps + 5, global_batch, threads=cores, use_gpu=args.use_gpu)
    ray_ips, ray_wall = ray_train(args.recipe, overrides, steps + 5, args.workers, use_gpu=args.use_gpu)
    print()
    print(f"recipe {args.recipe}, {steps} pixel steps, global batch {global_batch}, {cores} cores, "
          f"torch {torch.__version__}")
    print("| setup | img/s | vs plain |")
    print("|---|---|---|")
    where = ("1 GPU", f"{args.workers} GPU worker(s)") if args.use_gpu else (f"{cores} threads", f"{args.workers} workers x 1 thread")
    print(f"| plain loop, 1 process, {where[0]} | {plain:.1f} | 1.00 |")
    print(f"| Ray Train DDP, {where[1]} | {ray_ips:.1f} | {ray_ips / plain:.2f} |")
    print(f"Ray run wall time {ray_wall:.0f} s for {steps + 5} steps (start-up, data, validation included)")


if __name__ == "__main__":
    main()
