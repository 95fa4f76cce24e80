"""The end of a training run: the generator into MLflow, a summary for the user.

The run's status is set by `jobs.tracking.runs.run_lifecycle` around the whole job. When the tracking server
cannot take the final model (retried for `wait_s`), the run ends FAILED with the tag
`final_model_pending=true`; rerunning the same command (same --name) restores the last checkpoint, trains
nothing more, and logs the model.
"""

from __future__ import annotations

import re
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
from jobs.tracking.model_source import checkpoint_uri
from jobs.tracking.server import redact_text, redact_uri

RETRY_PAUSE_S = 5.0
SUMMARY_NAMES = {"psnr_y": "PSNR", "ssim_y": "SSIM"}  # the summary's header says "Y channel"


class FinalModelNotLogged(RuntimeError):
    """Training finished and is checkpointed, but MLflow did not take the final model in time."""

    mlflow_tags: ClassVar[dict[str, str]] = {"failure": "final_model_not_logged", "final_model_pending": "true"}


def finish_run(client: MlflowClient, run_id: str, cfg: Config, result, wait_s: float = 60.0,
               register: str | None = None) -> dict[str, float]:
    """Log the final generator (EMA weights) as a pyfunc model named after the run, with its validation
    metrics linked to it, retrying an unreachable server for `wait_s`; optionally register it.

    Args:
        register: also register the model as a new version of this registered model, described by
            `model_card` (data, steps, validation against bicubic, export files).

    Returns:
        The last metrics rank 0 reported, with `model_uri` (and `registered_version` with `register`).

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
                    info = log_generator_model(generator_file, name=model_name(cfg.run.name))
                link_validation_metrics(client, run_id, info.model_id)
                client.log_batch(run_id, tags=[RunTag("checkpoint_location", checkpoint_uri(result.checkpoint)),
                                               RunTag("model_uri", info.model_uri)])
                break
            except (MlflowException, OSError) as err:  # the server is down (requests' errors are OSErrors)
                if time.monotonic() + RETRY_PAUSE_S > deadline:
                    raise FinalModelNotLogged(
                        f"training finished (checkpoint {checkpoint_uri(result.checkpoint)}) but MLflow at "
                        f"{redact_uri(tracking_uri)} did not take the final model within {wait_s:.0f} s "
                        f"({type(err).__name__}: {redact_text(str(err))[:160]}); "
                        "rerun the same command (same --name) when it answers: it logs the model without training"
                    ) from err
                print(f"!! MLflow at {redact_uri(tracking_uri)} did not take the final model ({type(err).__name__}); "
                      f"retrying for up to {wait_s:.0f} s", file=sys.stderr, flush=True)
                time.sleep(RETRY_PAUSE_S)
    metrics["model_uri"] = info.model_uri
    if register:
        from jobs.tracking.registry import register_version

        files = ["generator.pt (gan_core)", "generator.safetensors"] + (
            ["generator.pth (BasicSR params_ema)"] if "basicsr_pth" in _artifact_names(info) else [])
        mv = register_version(client, register, info.model_uri, tags={"run_name": cfg.run.name, "source": "training"},
                              description=model_card(cfg, metrics, files, _artifact_names(info)))
        metrics["registered_version"] = mv.version
    return metrics


def link_validation_metrics(client: MlflowClient, run_id: str, model_id: str) -> None:
    """Link the run's last validation points to the logged model (its page then shows what it scored).

    The points are logged again with their original step, timestamp and value, plus the model id: the
    run's history keeps one point per step (the store drops exact duplicates), the model gets the link.
    """
    from mlflow.entities import Metric

    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith("val/")]
    points = []
    for key in keys:
        last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp), default=None)
        if last is not None:
            points.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    if points:
        client.log_batch(run_id, metrics=points)


def model_name(run_name: str | None) -> str:
    """The logged model's name: the run's name, in the characters MLflow allows in artifact paths."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_name or "generator").strip("-.") or "generator"


def validation_rows(cfg: Config, metrics: dict) -> list[tuple[str, str, float, float, str, str]]:
    """The run's last validation numbers against its task's baseline: (key, name, model, baseline, format, unit)
    for the task's metric first (`Task.gain`: PSNR-Y, or Qabf for fusion), then the others the task reports."""
    from gan_core.tasks import build_task
    from jobs.tracking.registry import DESCRIBED

    task = build_task(cfg)
    _, metric, _ = task.gain
    rows = []
    for key in dict.fromkeys([metric, *DESCRIBED]):
        name, fmt, unit = DESCRIBED.get(key, (key, ".4f", ""))
        ours, theirs = metrics.get(f"val/{key}"), metrics.get(f"val/{task.baseline}_{key}")
        if ours is not None and theirs is not None:
            rows.append((key, name, ours, theirs, fmt, unit))
    return rows


def model_card(cfg: Config, metrics: dict, files: list[str], artifacts: list[str] | None = None) -> str:
    """The registered version's description: what a teammate needs before using the model."""
    from gan_core.tasks import build_task

    g, task = cfg.generator, build_task(cfg)
    channels = f", task {task.name} ({g.num_in_ch} -> {g.num_out_ch} channels)"
    lines = [f"{g.name} x{g.scale} ({g.num_block} blocks, {g.num_feat} features, res_scale {g.res_scale}, "
             f"upsample_skip {g.upsample_skip}){channels}, trained by run {cfg.run.name!r}.",
             f"Data: train {cfg.data.train}, validation {cfg.data.val}.",
             f"Steps: {int(metrics.get('step', cfg.train.total_steps))} of {cfg.train.total_steps} "
             f"({cfg.train.pretrain_steps} pixel-loss pretraining, then GAN with {cfg.loss.adversarial} loss)."]
    rows = validation_rows(cfg, metrics)
    if rows:
        (_, name, ours, theirs, fmt, unit), *others = rows
        text = f"Validation: {name} {ours:{fmt}}{unit} vs {task.baseline} {theirs:{fmt}}{unit} ({ours - theirs:+{fmt}})"
        text += "".join(f", {n} {o:{f}} vs {task.baseline} {t:{f}}" for _, n, o, t, f, _ in others)
        lines.append(text + ".")
    from gan_core.portable import ecosystem_problems

    problems = ecosystem_problems(cfg.generator.model_dump())
    where = ("load in chaiNNer / ComfyUI (spandrel) and BasicSR" if not problems else
             "load in gan_core only (" + "; ".join(problems) + ")")
    lines.append(f"Files: {', '.join(files)}; the safetensors files {where}.")
    return "\n".join(lines)


def _artifact_names(info) -> list[str]:
    flavor = (info.flavors or {}).get("python_function", {})
    return sorted((flavor.get("artifacts") or {}).keys())


def print_summary(cfg: Config, result, metrics: dict, tracking_uri: str) -> None:
    """What a user wants to read when the run ends."""
    from gan_core.tasks import build_task

    line = "=" * 72
    print(line)
    rows = validation_rows(cfg, metrics)
    if rows:
        task = build_task(cfg)
        luma = any(key.endswith("_y") for key, *_ in rows)
        print(f"validation ({cfg.data.val}), task {task.name}" + (", Y channel" if luma else "")
              + (f", crop border {cfg.generator.scale}" if cfg.generator.scale > 1 else "") + ":")
        for index, (key, name, ours, theirs, fmt, unit) in enumerate(rows):
            name = SUMMARY_NAMES.get(key, name)
            gain = f" gain {ours - theirs:+{fmt}}{unit}" if index == 0 else ""  # the task's gain (Task.gain)
            model, base = f"{ours:{fmt}}{unit}", f"{theirs:{fmt}}{unit}"
            print(f"  {name:<5} model {model:<13} {task.baseline} {base:<13}{gain}".rstrip())
    print(f"checkpoint:   {checkpoint_uri(result.checkpoint)}")
    print(f"MLflow model: {metrics.get('model_uri', '-')}")
    if "registered_version" in metrics:
        print(f"registered:   version {metrics['registered_version']} (see its description for the model card)")
    if tracking_uri.startswith("sqlite:"):
        print(f"open MLflow:  mlflow ui --backend-store-uri {tracking_uri}")
    else:
        print(f"open MLflow:  {redact_uri(tracking_uri)}")
    print(line, flush=True)
