"""The end of a training run: the generator into MLflow, the run closed, a summary for the user."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from gan_core.checkpoint import export_generator
from gan_core.config import Config


def finish_run(client: MlflowClient, run_id: str, cfg: Config, result) -> dict[str, float]:
    """Log the final generator (EMA weights) as a pyfunc model and mark the run finished.

    Returns:
        The last metrics rank 0 reported.
    """
    from jobs.tracking.pyfunc import log_generator_model

    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if result.checkpoint is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    client.set_tag(run_id, "checkpoint_location", result.checkpoint.path)
    with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as tmp:
        generator_file = export_generator(directory, Path(tmp) / "generator.pt")
        # start_run(run_id) refuses a run of another experiment than the active one (set by an earlier caller).
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id):
            info = log_generator_model(generator_file, name="generator")
    client.set_tag(run_id, "model_uri", info.model_uri)
    client.set_terminated(run_id, status="FINISHED")
    metrics["model_uri"] = info.model_uri
    return metrics


def print_summary(cfg: Config, result, metrics: dict, tracking_uri: str) -> None:
    """What a user wants to read when the run ends."""
    line = "=" * 72
    print(line)
    if "val/psnr_y" in metrics:
        print(f"validation ({cfg.data.val}), Y channel, crop border {cfg.generator.scale}:")
        print(f"  PSNR  model {metrics['val/psnr_y']:.3f} dB   bicubic {metrics['val/bicubic_psnr_y']:.3f} dB   "
              f"gain {metrics['val/gain_psnr_y']:+.3f} dB")
        print(f"  SSIM  model {metrics['val/ssim_y']:.4f}      bicubic {metrics['val/bicubic_ssim_y']:.4f}")
    print(f"checkpoint:   {result.checkpoint.path}")
    print(f"MLflow model: {metrics.get('model_uri', '-')}")
    if tracking_uri.startswith("sqlite:"):
        print(f"open MLflow:  mlflow ui --backend-store-uri {tracking_uri}")
    else:
        print(f"open MLflow:  {tracking_uri}")
    print(line, flush=True)
