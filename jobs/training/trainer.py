"""The Ray Train side of a training run: its TorchTrainer, and the paths its workers can read.

`jobs.train` builds one trainer; `jobs.tune` one per trial, with its callbacks and resources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gan_core.config import Config
from gan_core.data.shards import shards_hold_pairs
from jobs.cli import JobError
from jobs.training.worker import train_loop_per_worker


def build_trainer(cfg: Config, *, num_workers: int | tuple[int, int], use_gpu: bool, loop_config: dict[str, Any],
                  callbacks: list | None = None, resources_per_worker: dict[str, float] | None = None,
                  placement_strategy: str = "PACK", resize_interval_s: float = 60.0):
    """The TorchTrainer of one run, named `cfg.run.name`, storing under `cfg.run.storage_path`.

    Args:
        num_workers: a fixed group size, or (min, max) for an elastic run: Ray Train starts it with as many
            workers as the cluster holds (at least min), and restarts the group from the latest checkpoint
            with fewer workers when a node is lost and with more when one comes (back). The global batch
            stays `data.batch_size * max` (each worker trains on its share, see `elastic_loop_config`).
        resources_per_worker: what each worker reserves, e.g. {"CPU": 1, "trainer": 1} for one worker per
            node that carries one custom `trainer` slot.
        placement_strategy: of the workers' placement group: PACK (default), SPREAD, STRICT_PACK, STRICT_SPREAD.
        resize_interval_s: an elastic run looks for more capacity this often (Ray's default 60 s).

    Raises:
        JobError: data.train or data.val does not exist, the shards lack what data.sampling needs, or an elastic
            run asks for what it cannot do.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    check_data_paths(cfg)
    if isinstance(num_workers, tuple):
        loop_config = loop_config | elastic_loop_config(cfg, num_workers)
    if cfg.data.loader == "stream":  # Ray Data decodes and crops; see jobs/training/stream.py
        from jobs.training.stream import StreamDatasetProvider

        dataset = StreamDatasetProvider(cfg, num_workers=num_workers, resume_from=loop_config.get("resume_from"))
    else:
        dataset = ray.data.read_parquet(cfg.data.train)
        names = dataset.schema().names
        columns = ["image", *(["input"] if "input" in names else [])]  # paired shards carry the input image too
        if cfg.task.name == "fusion" and "://" not in cfg.data.train and not shards_hold_pairs(cfg.data.train):
            raise JobError(f"task fusion trains on IR / visible pairs; the shards of {cfg.data.train} hold single "
                           "images: write them from ir/ and vi/ folders with `python -m jobs.prepare_data --task "
                           "fusion --src FOLDER --out SHARDS`")
        if cfg.data.sampling == "source":
            if "source" not in names:
                raise JobError(f"data.sampling=source needs a `source` column in the shards of {cfg.data.train}; "
                               "rewrite them with `python -m jobs.prepare_data` or use data.sampling=tile")
            # Rows mixed across workers, so that every worker sees every source photo (a shard holds a few photos).
            dataset = dataset.select_columns([*columns, "source"]).random_shuffle(seed=cfg.train.seed)
        else:
            dataset = dataset.select_columns(columns)
    # Same seed, same run: which rows each worker gets must not depend on which Ray Data task finishes
    # first (it did when two trials trained at once: equal-LR trials drifted apart by 2e-5 dB).
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    if cfg.data.loader == "stream":  # bounded read-ahead: the tasks keep pace with training instead of racing it
        ingest.resource_limits = ingest.resource_limits.copy(object_store_memory=cfg.data.stream_buffer_mb * 2**20)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
            placement_strategy=placement_strategy, elastic_resize_monitor_interval_s=resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute=cfg.run.checkpoint_metric,
                checkpoint_score_order=cfg.run.checkpoint_mode,
            ),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def elastic_loop_config(cfg: Config, num_workers: tuple[int, int]) -> dict[str, Any]:
    """What the workers of an elastic run need on top of the loop config: the global batch, `data.batch_size`
    times the largest group, held whatever the group's size so the LR schedule and the G/D balance, both
    counted in steps, mean the same thing at every size.

    Raises:
        JobError: data.loader=stream (its stream is cut for a fixed number of workers), or a group size whose
            per-worker batch the config rejects (e.g. data.blind.pool_size not a multiple of it).
    """
    from gan_core.config import ConfigError
    from gan_core.loop import per_worker_batch

    low, high = num_workers
    if cfg.data.loader == "stream":
        raise JobError("an elastic run (--num-workers MIN-MAX) needs data.loader=memory: the stream of "
                       "data.loader=stream is cut for a fixed number of workers")
    global_batch = cfg.data.batch_size * high
    for size in range(low, high + 1):
        for rank in range(size):
            try:
                cfg.with_values({"data.batch_size": per_worker_batch(global_batch, rank, size)})
            except (ConfigError, ValueError) as err:
                raise JobError(f"--num-workers {low}-{high}: with {size} workers each trains on its share of the "
                               f"global batch {global_batch}, and that config fails: {err}") from None
    return {"global_batch": global_batch}


def check_data_paths(cfg: Config) -> None:
    """Raises JobError when data.train or data.val is a local path that does not exist; inside a
    `ray job submit` job the message says why a relative path is missing and what to pass instead."""
    from jobs.cli import ray_job_copy

    copy = ray_job_copy()
    for key, value in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if copy is not None and "://" not in value and not Path(value).exists():
            relative = not Path(value).is_absolute() or Path(value).is_relative_to(copy)
            why = (f"relative paths resolve inside the uploaded working dir ({copy}), and `ray job submit "
                   "--working-dir` leaves out what .gitignore ignores (data/ is)" if relative else
                   "it is not on the node that runs this job")
            raise JobError(
                f"{key}={value} does not exist inside this Ray job: {why}. Pass an absolute path that every node "
                f"can read, e.g. {key}=$PWD/{Path(value).name if not relative else value} from the repository on a "
                "local head (your shell expands $PWD), a shared folder (/mnt/shared/...) on a cluster, or s3://...")
    if not Path(cfg.data.train).exists() and "://" not in cfg.data.train:
        raise JobError(
            f"data.train={cfg.data.train} does not exist. Write Parquet shards first: "
            "`python -m jobs.prepare_data --demo` (demo) or `python -m jobs.prepare_data --src <images> --out <dir>`"
        )
    if not Path(cfg.data.val).exists() and "://" not in cfg.data.val:
        raise JobError(
            f"data.val={cfg.data.val} does not exist: a folder of validation images (or of shards), e.g. "
            "data/demo/val from `python -m jobs.prepare_data --demo`"
        )


def with_absolute_paths(cfg: Config) -> Config:
    """A copy with relative local paths made absolute: Ray workers run in another working directory. A relative
    run.storage_path of a `ray job submit` job goes under jobs.cli.job_home(), not into Ray's temporary copy."""
    from jobs.cli import resolve_local_path

    updates = {}
    for key in ("data.train", "data.val", "train.init_from", "run.storage_path"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and ":/" not in value and key == "run.storage_path":
            updates[key] = str(resolve_local_path(value, key))  # in a submitted job: not in Ray's temporary copy
        elif value and "://" not in value and ":/" not in value and Path(value).exists():
            updates[key] = str(Path(value).resolve())
    return cfg.with_values(updates) if updates else cfg


def with_local_init_from(cfg: Config) -> Config:
    """A remote train.init_from (an MLflow URI, or s3://... of a checkpoint, run folder or .pth) is
    downloaded once, by the driver, into the run's storage folder when that is a file system (shared storage
    on a cluster); the copy returned points the workers at that file. When the run stores on a URI (s3://...),
    the spec stays and each worker downloads it (jobs.training.worker.local_init_from); the driver only checks
    here that it can be read, so a wrong path fails before an MLflow run exists.

    Raises:
        JobError: the model cannot be found or read.
    """
    import tempfile

    from jobs.tracking.model_source import is_mlflow_uri, is_remote_uri, resolve_model

    spec = cfg.train.init_from
    if not spec or not (is_mlflow_uri(spec) or is_remote_uri(spec)):
        return cfg
    if "://" in cfg.run.storage_path:
        with tempfile.TemporaryDirectory(prefix="init-from-check-") as tmp:
            resolve_model(spec, tmp)
        print(f"train.init_from: {spec} (each worker downloads it)", flush=True)
        return cfg
    source = resolve_model(spec, Path(cfg.run.storage_path) / cfg.run.name / "init_from")
    print(f"train.init_from: {spec} -> {source.path}", flush=True)
    return cfg.with_values({"train.init_from": str(source.path)})
