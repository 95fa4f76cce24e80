"""The end of a sweep: a table of trials, the best one, and the sweep's MLflow run filled in.

On the parent run: the trial table (`trials.csv`, `trials.txt`), the best config (`best_config.yaml`),
`best/<metric>`, tags naming the best trial's MLflow run and checkpoint, and `metric_vs_params.png`
(the metric against each searched hyperparameter). Each trial's own run gets its final status
(FINISHED, KILLED when the scheduler stopped it early, FAILED) and its checkpoint location. The sweep's
run ends FAILED when no trial succeeded (none reported the metric, or none finished and some errored),
KILLED when the sweep was interrupted, else FINISHED; `sweep_failure` says whether the command fails.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from gan_core.config import config_to_yaml
from jobs.sweeps.space import SpaceFile, trial_config
from jobs.sweeps.trial import TRIAL_ID_TAG
from jobs.tracking.model_source import checkpoint_uri
from jobs.tracking.server import redact_uri, without_password

MLFLOW_STATUS = {"finished": "FINISHED", "stopped early": "KILLED", "error": "FAILED", "interrupted": "KILLED"}


def collect_trials(results, space: SpaceFile, base: dict[str, Any], client: MlflowClient,
                   parent_run_id: str, tune_status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial: its searched values, status, last step, last and best metric, run and checkpoint.

    Args:
        results: the sweep's ray.tune.ResultGrid.
        space: the space file (metric, mode, searched keys).
        base: the base recipe as a dict (a trial's total_steps decides whether it was stopped early).
        client: MLflow client.
        parent_run_id: the sweep's run, whose children are the trials' runs.
        tune_status: Tune's status of each trial id when the sweep returned.
    """
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    runs = {run.data.tags.get(TRIAL_ID_TAG): run for run in children}
    metric, sign = space.metric, (1 if space.mode == "max" else -1)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = {key: result.config.get(key) for key in space.searched_keys()}
        history = result.metrics_dataframe
        values = [v for v in (history[metric].tolist() if history is not None and metric in history else [])
                  if isinstance(v, (int, float)) and math.isfinite(v)]
        step = int(metrics.get("step") or 0)
        total = trial_config(base, params).train.total_steps
        status = trial_status(tune_status.get(trial_id), result.error, step, total)
        checkpoint = (result.get_best_checkpoint(metric, space.mode) if values else None) or result.checkpoint
        run = runs.get(trial_id)
        tags = run.data.tags if run else {}
        rows.append({
            "trial": trial_id, "status": status, "step": step, "total_steps": total,
            "metric_last": values[-1] if values else None,
            "metric_best": max(values, key=lambda v: sign * v) if values else None,
            "params": params, "run_id": run.info.run_id if run else None,
            "checkpoint": checkpoint_uri(checkpoint) if checkpoint else None,
            "exploits": sorted((json.loads(value) for key, value in tags.items() if key.startswith("tune.exploit.")),
                               key=lambda record: record["step"]),
            "error": error_cause(result.error) if result.error else None,
        })
    return rows


def error_cause(error: BaseException) -> str:
    """The line of a trial's error that names its cause: Ray wraps a worker's exception in tracebacks of its
    own actors, and the worker's `SomeError: message` comes last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def trial_status(tune_status: str | None, error, step: int, total_steps: int) -> str:
    """finished, stopped early (by the scheduler), error, or interrupted (the sweep ended before the trial)."""
    if error is not None or tune_status == "ERROR":
        return "error"
    if tune_status not in (None, "TERMINATED"):
        return "interrupted"
    return "finished" if step >= total_steps else "stopped early"


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial with the best metric over its whole history (None when no trial reported)."""
    scored = [row for row in rows if row["metric_best"] is not None]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda row: sign * row["metric_best"])


def format_table(rows: list[dict[str, Any]], space: SpaceFile) -> str:
    """The trial table as aligned text."""
    keys = space.searched_keys()
    header = ["trial", "status", "step", f"{space.metric} last", "best", *keys, "exploits"]
    lines = [header]
    for row in rows:
        lines.append([
            row["trial"], row["status"], f"{row['step']}/{row['total_steps']}",
            _fmt(row["metric_last"]), _fmt(row["metric_best"]),
            *(_fmt(row["params"].get(key)) for key in keys), str(len(row["exploits"])),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_csv(rows: list[dict[str, Any]], space: SpaceFile) -> str:
    """The trial table as CSV (one column per searched key)."""
    keys = space.searched_keys()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "status", "step", "total_steps", f"{space.metric}_last", f"{space.metric}_best",
                     *keys, "exploits", "mlflow_run_id", "checkpoint"])
    for row in rows:
        writer.writerow([row["trial"], row["status"], row["step"], row["total_steps"], row["metric_last"],
                         row["metric_best"], *(row["params"].get(key) for key in keys), len(row["exploits"]),
                         row["run_id"], row["checkpoint"]])
    return buffer.getvalue()


def plot_metric_vs_params(rows: list[dict[str, Any]], space: SpaceFile, path: Path) -> Path:
    """One panel per searched key: each trial's best metric against its value (log x for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, dists = space.searched_keys(), space.distributions()
    columns = min(3, len(keys))
    lines = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    colors = {"finished": "tab:blue", "stopped early": "tab:orange", "error": "tab:red", "interrupted": "tab:gray"}
    for axis, key in zip(axes.flat, keys):
        scored = [row for row in rows if row["metric_best"] is not None and row["params"].get(key) is not None]
        values = [row["params"][key] for row in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
        else:  # categories (schedule names, lists) on an index axis
            categories = sorted({json.dumps(v) for v in values})
            xs = [categories.index(json.dumps(v)) for v in values]
            axis.set_xticks(range(len(categories)), [json.loads(c) if c.startswith('"') else c for c in categories],
                            rotation=30, ha="right", fontsize=8)
        for status, color in colors.items():
            chosen = [(x, row["metric_best"]) for x, row in zip(xs, scored) if row["status"] == status]
            if chosen:
                axis.scatter(*zip(*chosen), c=color, label=status, s=28)
        if numeric and dists[key].kind == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(space.metric)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    if axes.flat[0].get_legend_handles_labels()[0]:  # no trial reported: nothing to label
        axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"{space.metric} ({space.mode}) per trial: best value over its run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def finish_sweep(client: MlflowClient, parent_run_id: str, rows: list[dict[str, Any]], space: SpaceFile,
                 base: dict[str, Any]) -> dict[str, Any] | None:
    """Close every trial's run with its status and fill in the sweep's run.

    Returns:
        The best row, or None when no trial reported the metric.
    """
    for row in rows:
        if row["run_id"] is None:
            continue
        client.set_tag(row["run_id"], "tune.status", row["status"])
        client.set_tag(row["run_id"], "tune.stopped_early", str(row["status"] == "stopped early").lower())
        if row["checkpoint"]:
            client.set_tag(row["run_id"], "checkpoint_location", row["checkpoint"])
        client.set_terminated(row["run_id"], status=MLFLOW_STATUS[row["status"]])
    table = format_table(rows, space)
    client.log_text(parent_run_id, table + "\n", "trials.txt")
    client.log_text(parent_run_id, trials_csv(rows, space), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(parent_run_id, str(plot_metric_vs_params(rows, space, Path(tmp) / "metric_vs_params.png")))
    best = best_row(rows, space.mode)
    finished_trials = sum(row["status"] == "finished" for row in rows)
    client.log_metric(parent_run_id, "tune/trials", len(rows))
    client.log_metric(parent_run_id, "tune/stopped_early", sum(row["status"] == "stopped early" for row in rows))
    client.log_metric(parent_run_id, "tune/exploits", sum(len(row["exploits"]) for row in rows))
    client.log_metric(parent_run_id, "tune/finished", finished_trials)
    client.log_metric(parent_run_id, "tune/errors", sum(row["status"] == "error" for row in rows))
    if best is not None:
        client.log_metric(parent_run_id, f"best/{space.metric}", best["metric_best"])
        client.log_text(parent_run_id, config_to_yaml(trial_config(base, best["params"])), "best_config.yaml")
        client.log_dict(parent_run_id, best["params"], "best_params.json")
        for key, value in {"best_trial": best["trial"], "best_run_id": best["run_id"],
                           "best_checkpoint": best["checkpoint"]}.items():
            client.set_tag(parent_run_id, key, str(value))
    errors = any(row["status"] == "error" for row in rows)
    if any(row["status"] == "interrupted" for row in rows):
        client.set_terminated(parent_run_id, status="KILLED")  # a rerun with the same name resumes it
    else:
        failed = best is None or (errors and not finished_trials)
        client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")
    return best


def sweep_failure(rows: list[dict[str, Any]], best: dict[str, Any] | None, metric: str) -> str | None:
    """Why the sweep counts as failed (`python -m jobs.tune` then exits 1), or None when it succeeded.

    A sweep succeeds only when every trial finished or was stopped early by the scheduler and at least one
    reported `metric`. One errored trial fails it even when the others found a best config: a trial that
    crashes (out of memory, a bad value the checks let through) is a result nobody should miss in CI or in
    `ray job status`; the summary above the message still shows the best of the others.
    """
    errored = [row["trial"] for row in rows if row["status"] == "error"]
    interrupted = [row["trial"] for row in rows if row["status"] == "interrupted"]
    if not rows:
        return "the sweep ran no trial"
    if best is None:
        if len(errored) == len(rows):
            return f"all {len(rows)} trial(s) errored ({', '.join(errored)}): no trial reported {metric}"
        return f"no trial reported {metric}" + (f"; {len(errored)} of {len(rows)} trial(s) errored "
                                                 f"({', '.join(errored)})" if errored else "")
    if errored:
        return f"{len(errored)} of {len(rows)} trial(s) errored ({', '.join(errored)}; their errors are listed above)"
    if interrupted:
        return f"the sweep was interrupted: {len(interrupted)} of {len(rows)} trial(s) did not finish"
    return None


def print_summary(rows: list[dict[str, Any]], best: dict[str, Any] | None, space: SpaceFile, tracking_uri: str,
                  parent_run_id: str, experiment_path: str) -> None:
    """What a user reads when the sweep ends."""
    line = "=" * 100
    print(line)
    print(format_table(rows, space))
    for row in rows:
        for record in row["exploits"]:
            changes = ", ".join(f"{k} {_fmt(record['old'].get(k))} -> {_fmt(v)}" for k, v in record["new"].items())
            print(f"  exploit: {record['trial']} took {record['donor']}'s checkpoint at step {record['step']}: "
                  f"{changes}")
        if row["error"]:  # an MLflow error quotes the tracking URI as given
            print(f"  error in {row['trial']}: {without_password(row['error'], tracking_uri)}")
    print(line)
    if best is None:
        print(f"no trial reported {space.metric}")
    else:
        print(f"best trial {best['trial']}: {space.metric} {best['metric_best']:.4f} "
              f"({best['status']}, step {best['step']})")
        print(f"  config:     {json.dumps(best['params'])}")
        print(f"  checkpoint: {best['checkpoint']}")
        print(f"  MLflow run: {best['run_id']} (sweep run {parent_run_id})")
    print(f"Tune results: {experiment_path}")
    shown = redact_uri(tracking_uri)  # never a password in a log
    print(f"open MLflow:  {'mlflow ui --backend-store-uri ' + shown if tracking_uri.startswith('sqlite:') else shown}")
    print(line, flush=True)
