"""Gated promotion: register the best training run's generator and move the alias only if it wins.

Locally:
    python -m jobs.promote --experiment gan-enhance-demo --registered-model esrgan-x4 --metric val/psnr_y \
        --data data/demo/val [--alias champion] [--min-improvement 0.05] [--min-gain-db 0.0] [--dry-run]
    python -m jobs.promote --experiment fusion-demo --registered-model fusion --data data/demo/fusion/val \
        [--min-gain 0.01]            # the task's metric (val/qabf) and baseline (the average) by default
    python -m jobs.promote --registered-model esrgan-x4 --alias champion --version 3 [--force]   # rollback
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.promote --experiment gan-enhance --registered-model esrgan-x4 --metric val/psnr_y \
        --data /shared/val --tracking-uri http://<head>:5000

1. The candidate is the finished run of the experiment (training runs and sweep trials alike) with
   the best `--metric` that has a generator (tag `model_uri`, else `checkpoint_location`); --run-id picks one.
   Without --metric, the metric is the task's (`task.name` of the runs): val/psnr_y (sr, denoise, lowlight),
   val/qabf (fusion).
2. It is re-evaluated on the held-out --data (default: the run's own `data.val`), and so is the
   current alias holder, on the same images: training-time numbers are never trusted across runs.
3. It is registered as a new version carrying the evaluation (`eval.*` tags), and the job waits until
   the version is READY.
4. Under a registry-wide lock, the alias holder is read again; if another promotion moved it meanwhile,
   the comparison is redone against the new holder. Only then, and only if the candidate passes the
   promotion gate (`jobs.tracking.registry.gate_promotion`), the alias moves. The gate refuses, even
   when no version holds the alias: outputs that are not finite (NaN/Inf) on any held-out image, and a
   gain over the task's baseline of --min-gain or less (default 0): PSNR-Y over bicubic (sr, dB), over the
   input (denoise, lowlight, dB), Qabf over the average of IR and visible (fusion). The task is the one the
   candidate's generator file records; the holder must be of the same task. Against a holder it also requires
   a --metric improvement above --min-improvement and no regression on PSNR-Y, SSIM-Y, or LPIPS (when
   both have it). The decision and its numbers are written as `promotion.*` tags on the version and
   printed; a refusal is a normal outcome (exit status 0, `"decision": "refused"`).

A rollback (--version N) is the operator's explicit choice and skips the gate, except that it refuses a
version whose recorded evaluation (`eval.*` tags) shows non-finite outputs unless --force is given.

The lock is a compare-and-set made from what the registry guarantees: creating a registered model
whose name exists fails atomically on the server, so the job that creates `<model>--<alias>--lock`
owns the alias until it deletes it. A lock older than --lock-ttl (a crashed job) is broken.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from jobs.cli import JobError, run_main
from jobs.tracking.registry import (
    alias_holder,
    alias_lock,
    gate_promotion,
    gated_alias_move,
    recorded_nonfinite,
    register_version,
    wait_until_ready,
)
from jobs.tracking.server import TRACKING_HELP

HIGHER_IS_WORSE = ("lpips",)


# -- choosing and scoring ----------------------------------------------------------------------------

def eval_key(metric: str) -> str:
    """`val/psnr_y` (a training metric) -> `psnr_y` (the key jobs.evaluate computes)."""
    return metric.split("/")[-1]


def candidate_metric(client, args) -> str:
    """--metric, else the validation metric of the candidates' task (`task.name` of the runs; sr when a run
    does not say).

    Raises:
        JobError: the experiment's finished runs are of several tasks (then --metric must choose).
    """
    from mlflow.exceptions import MlflowException

    from gan_core.task_config import TaskSection

    if args.metric:
        return args.metric
    if args.run_id:
        try:
            runs = [client.get_run(args.run_id)]
        except MlflowException as err:
            raise JobError(f"--run-id {args.run_id}: {err.message}") from err
    else:
        found = client.get_experiment_by_name(args.experiment)
        if found is None:
            raise JobError(f"--experiment {args.experiment!r} does not exist in this MLflow")
        runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=500)
    tasks = sorted({run.data.params.get("task.name", "sr") for run in runs}) or ["sr"]
    if len(tasks) > 1:
        raise JobError(f"experiment {args.experiment!r} holds runs of tasks {', '.join(tasks)}: pass --metric "
                       "(and --run-id) to choose")
    return TaskSection(name=tasks[0]).default_checkpoint_metric


def higher_is_better(metric: str, mode: str | None) -> bool:
    """--mode if given, else: LPIPS is lower-is-better, everything else higher."""
    if mode:
        return mode == "max"
    return not any(word in metric for word in HIGHER_IS_WORSE)


def best_candidate(client, experiment: str, metric: str, maximize: bool, run_id: str | None):
    """The finished run with the best `metric` that has a generator (or the run `run_id`).

    Raises:
        JobError: no such experiment, run, or no finished run with the metric and a generator.
    """
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException as err:
            raise JobError(f"--run-id {run_id}: {err.message}") from err
    found = client.get_experiment_by_name(experiment) if experiment else None
    if found is None:
        raise JobError(f"--experiment {experiment!r} does not exist in this MLflow")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=[f"metrics.`{metric}` {'DESC' if maximize else 'ASC'}"], max_results=500)
    usable = [r for r in runs if metric in r.data.metrics
              and (r.data.tags.get("model_uri") or r.data.tags.get("checkpoint_location"))]
    if not usable:
        raise JobError(f"experiment {experiment!r} has no finished run with metric {metric!r} and a generator "
                       f"(tag model_uri or checkpoint_location)")
    return usable[0]


def metric_lpips(key: str, weights_path: str | None):
    """The LPIPS module when the deciding metric needs it, else None.

    Raises:
        JobError: the metric is LPIPS and its backbone weights are not on this machine.
    """
    if "lpips" not in key:
        return None
    from gan_core.scoring import load_lpips

    lpips, why = load_lpips(weights_path)
    if lpips is None:
        raise JobError(f"--metric {key} needs LPIPS: {why} (pass --lpips-weights)")
    return lpips


def score(spec_or_run, data: str, args, workdir: Path, lpips=None,
          task_name: str | None = None) -> tuple[dict[str, float], object, object]:
    """Held-out means (with `nonfinite_images`) of a run's generator or of a model URI, its ModelSource and its
    task (gan_core.tasks; the one its generator file records). Synthetic inputs (denoise, lowlight on clean
    images) are seeded by 0 and each image: every model is scored on the same inputs.

    Args:
        task_name: the task the model must be of (the candidate's, when scoring the alias holder).

    Raises:
        JobError: the model cannot be loaded, is of another task than `task_name`, or --data is unreadable.
    """
    from gan_core.checkpoint import load_generator
    from gan_core.scoring import (
        evaluate_generator_checked,
        load_eval_images,
        pick_device,
    )
    from jobs.evaluate import model_task
    from jobs.tracking.model_source import resolve_model, run_generator

    source = (resolve_model(spec_or_run, workdir) if isinstance(spec_or_run, str)
              else run_generator(spec_or_run, workdir))
    device = pick_device(args.device)
    try:
        generator = load_generator(source.path, device=device)
    except ValueError as err:
        raise JobError(f"{source.spec}: {err}") from err
    task = model_task(source.path, generator)
    if task_name is not None and task.name != task_name:
        raise JobError(f"{source.spec} is a {task.name} model; the candidate is a {task_name} model: they cannot "
                       "be compared (promote it to another registered model)")
    try:
        images = [img for _, img in load_eval_images(data, args.max_images, args.crop, task=task.name)]
    except FileNotFoundError as err:
        raise JobError(f"--data {err}") from err
    try:
        return evaluate_generator_checked(generator, images, device, lpips, task=task), source, task
    except ValueError as err:  # e.g. fusion data without its infrared images
        raise JobError(f"--data {data}: {err}") from err


# -- the two commands --------------------------------------------------------------------------------

def rollback(client, args) -> dict:
    """Point the alias at an existing READY version (not the gate: the operator chose it).

    Raises:
        JobError: no such version, not READY, or its recorded evaluation shows non-finite outputs
            (NaN/Inf) and --force was not given.
    """
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(args.registered_model, str(args.version))
    except MlflowException as err:
        raise JobError(f"{args.registered_model} version {args.version}: {err.message}") from err
    if mv.status != "READY":
        raise JobError(f"{args.registered_model} version {args.version} is {mv.status}, not READY")
    broken = recorded_nonfinite(mv.tags)
    if broken and not args.force:
        raise JobError(f"{args.registered_model} version {mv.version}: {broken}; pass --force to point "
                       f"@{args.alias} at it anyway")
    with alias_lock(client, args.registered_model, args.alias, wait_s=args.lock_wait, ttl_s=args.lock_ttl):
        previous = alias_holder(client, args.registered_model, args.alias)
        client.set_registered_model_alias(args.registered_model, args.alias, mv.version)
    client.set_model_version_tag(args.registered_model, mv.version, "promotion.rollback",
                                 f"@{args.alias} moved from version {previous} to {mv.version} at {time.ctime()}")
    print(f"{args.registered_model}@{args.alias}: version {previous} -> {mv.version} (rollback"
          + (f", forced: {broken})" if broken else ")"))
    return {"decision": "rollback", "version": mv.version, "previous": previous}


def promote(client, args) -> dict:
    """Steps 1-4 of the module docstring; returns the decision and its numbers."""
    from jobs.tracking.registry import describe_evaluation

    metric = candidate_metric(client, args)
    maximize = higher_is_better(metric, args.mode)
    key, name, alias = eval_key(metric), args.registered_model, args.alias
    lpips = metric_lpips(key, args.lpips_weights)  # fail fast when the metric cannot be computed here
    run = best_candidate(client, args.experiment, metric, maximize, args.run_id)
    run_id = run.info.run_id
    print(f"candidate: run {run_id} ({run.info.run_name}), {metric} = {run.data.metrics.get(metric)}")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    # A version whose decision is still pending was registered by a promotion that died before deciding: finish it.
    pending = [mv for mv in existing if mv.tags.get("promotion.decision") == "pending"]
    if existing and not pending and not args.dry_run:
        versions = sorted(mv.version for mv in existing)
        print(f"run {run_id} is already registered as {name} version(s) {', '.join(versions)}; nothing to do "
              f"(move the alias with --version N)")
        return {"decision": "already-registered", "versions": versions, "run_id": run_id}
    data = args.data or run.data.params.get("data.val")
    if not data:
        raise JobError(f"no --data given and run {run_id} has no `data.val` param")
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        ours, source, task = score(run, data, args, Path(tmp) / "candidate", lpips)
        if key not in ours:
            raise JobError(f"--metric {metric}: task {task.name}'s evaluation computes {sorted(ours)}, not {key!r}")
        base_key = f"{task.baseline}_{key}"
        baseline = f" ({task.baseline} {ours[base_key]:.4f})" if base_key in ours else ""
        print(f"held-out {key} on {data} (task {task.name}): candidate {ours[key]:.4f}{baseline}")
        scored: dict[str, dict[str, float]] = {}  # version -> its means on these same images
        gate = {"metric": metric, "maximize": maximize, "min_improvement": args.min_improvement,
                "min_gain": args.min_gain, "gain": task.gain}

        def score_version(version: str) -> dict[str, float]:
            if version not in scored:
                spec = f"models:/{name}/{version}"
                scored[version] = score(spec, data, args, Path(tmp) / f"v{version}", lpips, task.name)[0]
            return scored[version]

        if args.dry_run:
            holder = alias_holder(client, name, alias)
            verdict = gate_promotion(ours, score_version(holder) if holder else None, holder, alias=alias, **gate)
            print(f"dry run: would {'promote' if verdict.promote else 'refuse'}: {verdict.reason}")
            return {"decision": "dry-run", "would_promote": verdict.promote, "reason": verdict.reason,
                    "failed": list(verdict.failed), "run_id": run_id, "candidate": ours[key], "holder": holder}
        if pending:
            mv = wait_until_ready(client, name, pending[0].version)
            print(f"resuming the undecided {name} version {mv.version}")
        else:
            model_uri = source.model_uri or _log_model_from_checkpoint(run_id, source.path, Path(tmp))
            mv = register_version(client, name, model_uri, {
                **{f"eval.{k}": f"{v:.6g}" for k, v in ours.items()},
                "eval.data": str(data), "task": task.name, "source_run_id": run_id, "promotion.decision": "pending"},
                description=describe_evaluation(ours, data, run_id, task.gain))
            print(f"registered {name} version {mv.version} (READY) from {model_uri}")
        # 4. Compare-and-set under the lock, through the gate.
        verdict = gated_alias_move(client, name, alias, mv.version, ours, score_version, **gate,
                                   lock_wait_s=args.lock_wait, lock_ttl_s=args.lock_ttl)
    _log_heldout(client, run_id, ours)
    decision = "promoted" if verdict.promote else "refused"
    holder = verdict.holder_version
    outcome = (f"@{alias} -> version {mv.version}" if verdict.promote
               else f"@{alias} stays on version {holder}" if holder else f"@{alias} stays unset")
    print(f"{decision.upper()}: {name} version {mv.version}: {verdict.reason}; {outcome}")
    return {"decision": decision, "reason": verdict.reason, "failed": list(verdict.failed), "version": mv.version,
            "run_id": run_id, "candidate": ours[key], "holder": holder, "holder_value": verdict.holder_value}


def _log_heldout(client, run_id: str, means: dict[str, float]) -> None:
    """The held-out numbers also go to the candidate run, next to its training curves."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"heldout/{k}", float(v), now, 0) for k, v in means.items()])


def _log_model_from_checkpoint(run_id: str, checkpoint: Path, tmp: Path) -> str:
    """A run with a checkpoint but no logged model: log the slim generator into it as a pyfunc model."""
    import mlflow

    from gan_core.checkpoint import export_generator
    from jobs.tracking.pyfunc import log_generator_model

    slim = export_generator(checkpoint, tmp / "generator.pt")
    with mlflow.start_run(run_id=run_id):
        return log_generator_model(slim, name="generator").model_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registered-model", required=True, help="registered model name, e.g. esrgan-x4")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--version", help="rollback: point --alias at this existing version and stop")
    parser.add_argument("--experiment", help="where the candidate runs are (training runs and sweep trials)")
    parser.add_argument("--metric", help="run metric that ranks candidates; its last part (psnr_y) is the held-out "
                        "metric that decides (default: the task's, val/psnr_y; val/qabf for fusion)")
    parser.add_argument("--mode", choices=("max", "min"), help="default: min for LPIPS, else max")
    parser.add_argument("--min-improvement", type=float, default=0.0,
                        help="required margin over the alias holder, in --metric units")
    parser.add_argument("--min-gain", "--min-gain-db", type=float, default=0.0, dest="min_gain",
                        help="required held-out gain over the task's baseline, even with no holder: PSNR-Y over "
                        "bicubic (sr) or the input (denoise, lowlight) in dB, Qabf over the average of IR and "
                        "visible (fusion) (default 0: the model must beat it; lower it for perceptual models that "
                        "trade PSNR for detail)")
    parser.add_argument("--run-id", help="consider this run instead of the experiment's best")
    parser.add_argument("--data", help="held-out HR images (folder or shards); default: the run's data.val")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--crop", type=int, help="centre-crop held-out images to this side (quick CPU runs)")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--lpips-weights",
                        help="AlexNet backbone for LPIPS metrics (else $GAN_CORE_WEIGHTS_DIR, hub cache)")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and print the decision; register nothing")
    parser.add_argument("--force", action="store_true",
                        help="rollback only: move the alias even to a version whose recorded evaluation shows "
                        "non-finite outputs")
    parser.add_argument("--lock-wait", type=float, default=300.0, help="seconds to wait for a concurrent promotion")
    parser.add_argument("--lock-ttl", type=float, default=600.0, help="a lock older than this is from a crashed job")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    args = parser.parse_args(argv)
    if args.version is None and not (args.experiment or args.run_id):
        parser.error("give --experiment (or --run-id) to promote, or --version to roll back")
    if args.force and args.version is None:
        parser.error("--force only applies to a rollback (--version N); promotion always goes through the gate")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Promote or roll back; returns the decision (also printed)."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.server import connect

    args = parse_args(argv)
    client = MlflowClient(connect(args.tracking_uri))
    return rollback(client, args) if args.version else promote(client, args)


if __name__ == "__main__":
    run_main(main)
