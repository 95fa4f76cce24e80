"""The Ray Train side of a training run: its TorchTrainer, and the paths its workers can read.

`jobs.train` builds one trainer; `jobs.tune` one per trial, with its callbacks and resources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gan_core.config import Config
from jobs.cli import JobError
from jobs.training.worker import train_loop_per_worker


def build_trainer(cfg: Config, *, num_workers: int, use_gpu: bool, loop_config: dict[str, Any],
                  callbacks: list | None = None, resources_per_worker: dict[str, float] | None = None):
    """The TorchTrainer of one run, named `cfg.run.name`, storing under `cfg.run.storage_path`.

    Raises:
        JobError: data.train or data.val does not exist, or the shards lack what data.sampling needs.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    check_data_paths(cfg)
    dataset = ray.data.read_parquet(cfg.data.train)
    if cfg.data.sampling == "source":
        if "source" not in dataset.schema().names:
            raise JobError(f"data.sampling=source needs a `source` column in the shards of {cfg.data.train}; "
                           "rewrite them with `python -m jobs.prepare_data` or use data.sampling=tile")
        # Rows mixed across workers, so that every worker sees every source photo (a shard holds a few photos).
        dataset = dataset.select_columns(["image", "source"]).random_shuffle(seed=cfg.train.seed)
    else:
        dataset = dataset.select_columns(["image"])
    # Same seed, same run: which rows each worker gets must not depend on which Ray Data task finishes
    # first (it did when two trials trained at once: equal-LR trials drifted apart by 2e-5 dB).
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
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


def check_data_paths(cfg: Config) -> None:
    """Raises JobError when data.train or data.val is a local path that does not exist."""
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
    """A copy with relative local paths made absolute: Ray workers run in another working directory."""
    updates = {}
    for key in ("data.train", "data.val", "train.init_from", "run.storage_path"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and ":/" not in value and (Path(value).exists() or key == "run.storage_path"):
            updates[key] = str(Path(value).resolve())
    return cfg.with_values(updates) if updates else cfg


def with_local_init_from(cfg: Config) -> Config:
    """An MLflow URI in train.init_from is downloaded once, by the driver, into the run's storage folder
    (shared storage on a cluster); the copy returned points the workers at that file.

    Raises:
        JobError: the run stores on a URI (s3://...), where workers could not read a local download.
    """
    from jobs.tracking.model_source import is_mlflow_uri, resolve_model

    spec = cfg.train.init_from
    if not spec or not is_mlflow_uri(spec):
        return cfg
    if "://" in cfg.run.storage_path:
        raise JobError(f"train.init_from={spec} needs a file-system run.storage_path (NFS on a cluster), "
                       f"not {cfg.run.storage_path}; download the model and pass its path instead")
    source = resolve_model(spec, Path(cfg.run.storage_path) / cfg.run.name / "init_from")
    print(f"train.init_from: {spec} -> {source.path}", flush=True)
    return cfg.with_values({"train.init_from": str(source.path)})
