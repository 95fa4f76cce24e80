"""Worker memory and throughput of data.loader=memory against data.loader=stream, as the data set grows.

    python -m bench.data_memory [--quick] [--tiles 500 5000] [--tile 128] [--batches 150] [--train-steps 40]

For each tile count it writes that many synthetic photo-like PNG tiles into Parquet shards with the shard
writer (`write_shards`), then, for each loader, runs a TorchTrainer with `--workers` workers on a local Ray
cluster (cores + 2 logical CPUs, so stream tasks have CPUs next to the trainers). Each worker builds its
batches exactly as `jobs/training/worker.py` does (memory: decode its whole shard, PatchSampler; stream:
StreamBatches over its dataset shard) and measures:
  first batch   seconds from the start of the loop to the first batch (memory: decoding the shard)
  data          patches/s per worker pulling `--batches` batches with nothing else to do
  train         img/s per worker of `--train-steps` pixel steps of the demo recipe's model (no DDP), fed by
                the same iterator, so the data work competes with the step for the cores as in a real run
  RSS           the worker process's resident memory before its data is touched and its peak
                (getrusage ru_maxrss) at the end; Ray's shared-memory object store pages a worker reads
                count in its RSS
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_tiles(folder: Path, count: int, size: int) -> Path:
    """`count` synthetic PNG tiles of `size` px, written into shards under folder/shards."""
    from gan_core.data import encode_png, write_shards
    from bench.data_throughput import synthetic_tile

    images = folder / "images"
    images.mkdir(parents=True)
    for index in range(count):
        (images / f"tile-{index:05d}.png").write_bytes(encode_png(synthetic_tile(size, index)))
    write_shards(images, folder / "shards")
    return folder / "shards"


def bench_worker(config: dict) -> None:
    """The loop of one Ray Train worker: batches as jobs/training/worker.py makes them, timed and measured."""
    import ray.train
    import torch

    from gan_core import loop
    from gan_core.config import config_from_dict
    from gan_core.step import train_step
    from jobs.training.stream import StreamBatches
    from jobs.training.worker import decode_rows

    torch.set_num_threads(1)
    cfg = config_from_dict(config["config"])
    rank = ray.train.get_context().get_world_rank()
    rss_start = current_rss_mb()
    start = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    if cfg.data.loader == "stream":
        batches = iter(StreamBatches(shard, batch_size=cfg.data.batch_size, prefetch_batches=cfg.data.prefetch_batches))
        held = 0
    else:
        images, _ = decode_rows(((row["image"], None, None) for row in shard.iter_rows()), rank)
        held = len(images)
        batches = iter(loop.make_sampler(cfg, images, rank=rank))
    next(batches)
    first = time.perf_counter() - start
    began = time.perf_counter()
    for _ in range(config["batches"]):
        next(batches)
    data = config["batches"] * cfg.data.batch_size / (time.perf_counter() - began)
    train = None
    if config["train_steps"]:
        state = loop.setup_state(cfg, torch.device("cpu"))
        source = loop.device_batches(batches, torch.device("cpu"), cfg)
        train_step(state, source, cfg)  # warm-up
        began = time.perf_counter()
        for _ in range(config["train_steps"]):
            train_step(state, source, cfg)
        train = config["train_steps"] * cfg.data.batch_size / (time.perf_counter() - began)
    result = {"rank": rank, "images_held": held, "first_batch_s": first, "data_patches_per_s": data,
              "train_img_per_s": train, "rss_start_mb": rss_start, "rss_peak_mb": peak_rss_mb()}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(result))
    ray.train.report({"done": 1})


def run_mode(shards: Path, loader: str, args, out: Path) -> list[dict]:
    """Every worker's measurements of one run with `loader`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from gan_core.config import load_config
    from jobs.training.trainer import build_trainer

    # A long run, as in practice: the stream's tasks then fill their bounded buffer and keep pace with training,
    # rather than finishing a short data set while the workers train (which measures a transient, not a run).
    steps = 100_000
    cfg = load_config(args.recipe, [f"data.train={shards}", f"data.val={shards}", f"data.loader={loader}",
                                    "data.sampling=tile", f"data.patch_size={args.patch}",
                                    f"data.batch_size={args.batch}", f"train.total_steps={steps}",
                                    f"train.pretrain_steps={steps}", "train.ema_decay=0",
                                    f"run.storage_path={out / 'results'}", f"run.name=bench-{loader}",
                                    "train.channels_last=false", *args.overrides])
    out.mkdir(parents=True, exist_ok=True)
    loop_config = {"config": cfg.model_dump(mode="json"), "out": str(out), "batches": args.batches,
                   "train_steps": args.train_steps}
    # build_trainer's datasets and ingest options, with this file's loop in place of the training loop.
    trainer = build_trainer(cfg, num_workers=args.workers, use_gpu=False, loop_config=loop_config)
    trainer = TorchTrainer(bench_worker, train_loop_config=loop_config, datasets=trainer.datasets,
                           dataset_config=trainer.data_config,
                           scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
                           run_config=ray.train.RunConfig(name=f"bench-{loader}", storage_path=str(out / "results")))
    trainer.fit()
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(args.workers)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 and 120 tiny tiles, a few batches")
    parser.add_argument("--tiles", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--tile", type=int, default=128, help="tile side in px (default 128)")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=150, help="batches pulled per worker for the data rate")
    parser.add_argument("--train-steps", type=int, default=40, help="pixel steps per worker for the train rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loaders", nargs="+", default=["memory", "stream"])
    parser.add_argument("--recipe", default="jobs/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.quick:
        if args.tiles == parser.get_default("tiles"):
            args.tiles = [40, 120]
        args.tile, args.patch, args.batch, args.batches, args.train_steps = 48, 32, 2, 5, 1
        args.overrides = ["generator.num_feat=8", "generator.num_block=1", "generator.num_grow_ch=8", *args.overrides]
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    cores = os.cpu_count() or 1
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)  # its own cluster, whatever RAY_ADDRESS says
    table = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for count in args.tiles:
                shards = write_tiles(Path(tmp) / f"tiles{count}", count, args.tile)
                size = sum(f.stat().st_size for f in shards.glob("*.parquet")) / 2**20
                for loader in args.loaders:
                    workers = run_mode(shards, loader, args, Path(tmp) / f"out{count}-{loader}")
                    table.append({"tiles": count, "shard_mb": size, "loader": loader,
                                  "images_held": sum(w["images_held"] for w in workers),
                                  "first_batch_s": max(w["first_batch_s"] for w in workers),
                                  "data": float(np.mean([w["data_patches_per_s"] for w in workers])),
                                  "train": (float(np.mean([w["train_img_per_s"] for w in workers]))
                                            if args.train_steps else None),
                                  "rss_start_mb": max(w["rss_start_mb"] for w in workers),
                                  "rss_peak_mb": max(w["rss_peak_mb"] for w in workers)})
    finally:
        if started:
            ray.shutdown()
    print(f"\n{args.workers} workers, {args.tile} px tiles, patch {args.patch}, batch {args.batch}, "
          f"{cores} cores ({cores + 2} logical CPUs for Ray)")
    print("| tiles (shards MB) | loader | images held by workers | first batch s | data patches/s/worker | "
          "train img/s/worker | worker RSS start -> peak MB |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        train = "-" if row["train"] is None else f"{row['train']:.1f}"
        print(f"| {row['tiles']} ({row['shard_mb']:.0f}) | {row['loader']} | {row['images_held']} | "
              f"{row['first_batch_s']:.1f} | {row['data']:.0f} | {train} | "
              f"{row['rss_start_mb']:.0f} -> {row['rss_peak_mb']:.0f} |")
    return table


if __name__ == "__main__":
    main()
