"""The end of a training run: the generator into MLflow, a summary for the user.

The run's status is set by `jobs.tracking.runs.run_lifecycle` around the whole job. When the tracking server
cannot take the final model (retried for `wait_s`), the run ends FAILED with the tag
`final_model_pending=true`; rerunning the same command (same --name) restores the last checkpoint, trains
nothing more, and logs the model.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import mlflow
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gan_core.checkpoint import export_generator
from gan_core.config import Config
from jobs.tracking.server import redact_text, redact_uri

RETRY_PAUSE_S = 5.0


class FinalModelNotLogged(RuntimeError):
    """Training finished and is checkpointed, but MLflow did not take the final model in time."""

    mlflow_tags: ClassVar[dict[str, str]] = {"failure": "final_model_not_logged", "final_model_pending": "true"}


def finish_run(client: MlflowClient, run_id: str, cfg: Config, result, wait_s: float = 60.0) -> dict[str, float]:
    """Log the final generator (EMA weights) as a pyfunc model, retrying an unreachable server for `wait_s`.

    Returns:
        The last metrics rank 0 reported, with `model_uri`.

    Raises:
        RuntimeError: training ended without a checkpoint.
        FinalModelNotLogged: the server did not take the model within `wait_s` seconds.
    """
    from jobs.tracking.pyfunc import log_generator_model

    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    tracking_uri = redact_uri(client.tracking_uri)
    deadline = time.monotonic() + wait_s
    with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as tmp:
        generator_file = export_generator(directory, Path(tmp) / "generator.pt")
        while True:
            try:
                # start_run(run_id) refuses a run of another experiment than the active one (set by an earlier caller).
                mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
                with mlflow.start_run(run_id=run_id):
                    info = log_generator_model(generator_file, name="generator")
                client.log_batch(run_id, tags=[RunTag("checkpoint_location", result.checkpoint.path),
                                               RunTag("model_uri", info.model_uri)])
                break
            except (MlflowException, OSError) as err:  # the server is down (requests' errors are OSErrors)
                if time.monotonic() + RETRY_PAUSE_S > deadline:
                    raise FinalModelNotLogged(
                        f"training finished (checkpoint {result.checkpoint.path}) but MLflow at "
                        f"{redact_uri(tracking_uri)} did not take the final model within {wait_s:.0f} s "
                        f"({type(err).__name__}: {redact_text(str(err))[:160]}); "
                        "rerun the same command (same --name) when it answers: it logs the model without training"
                    ) from err
                print(f"!! MLflow at {redact_uri(tracking_uri)} did not take the final model ({type(err).__name__}); "
                      f"retrying for up to {wait_s:.0f} s", file=sys.stderr, flush=True)
                time.sleep(RETRY_PAUSE_S)
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
        print(f"open MLflow:  {redact_uri(tracking_uri)}")
    print(line, flush=True)
