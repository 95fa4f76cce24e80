"""Gated promotion: register the best training run's generator and move the alias only if it wins.

Locally:
    python -m jobs.promote --experiment gan-enhance-demo --registered-model esrgan-x4 --metric val/psnr_y \
        --data data/demo/val [--alias champion] [--min-improvement 0.05] [--dry-run]
    python -m jobs.promote --registered-model esrgan-x4 --alias champion --version 3      # rollback
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.promote --experiment gan-enhance --registered-model esrgan-x4 --metric val/psnr_y \
        --data /shared/val --tracking-uri http://<head>:5000

1. The candidate is the finished run of the experiment (training runs and sweep trials alike) with
   the best `--metric` that has a generator (tag `model_uri`, else `checkpoint_location`); --run-id picks one.
2. It is re-evaluated on the held-out --data (default: the run's own `data.val`), and so is the
   current alias holder, on the same images: training-time numbers are never trusted across runs.
3. It is registered as a new version carrying the evaluation (`eval.*` tags), and the job waits until
   the version is READY.
4. Under a registry-wide lock, the alias holder is read again; if another promotion moved it meanwhile,
   the comparison is redone against the new holder. Only then, and only if the candidate beats the
   holder by more than --min-improvement, the alias moves. The decision and its numbers are written
   as `promotion.*` tags on the version and printed.

The lock is a compare-and-set made from what the registry guarantees: creating a registered model
whose name exists fails atomically on the server, so the job that creates `<model>--<alias>--lock`
owns the alias until it deletes it. A lock older than --lock-ttl (a crashed job) is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from jobs.common import JobError, check_tracking_server, resolve_tracking_uri, run_main

LOCK_SUFFIX = "lock"
HIGHER_IS_WORSE = ("lpips",)


# -- registry primitives (also used by jobs.import_weights) ------------------------------------------

def ensure_registered_model(client, name: str) -> None:
    """Create the registered model unless it exists (a concurrent creator is fine)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def wait_until_ready(client, name: str, version: str, timeout_s: float = 300.0):
    """Poll a model version until READY.

    Raises:
        JobError: the registration failed or did not finish in time.
    """
    deadline = time.time() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION":
            raise JobError(f"{name} version {version} failed to register: {mv.status_message}")
        if time.time() > deadline:
            raise JobError(f"{name} version {version} still {mv.status} after {timeout_s:.0f} s")
        time.sleep(0.5)


def register_version(client, name: str, model_uri: str, tags: dict[str, str], description: str | None = None):
    """Register `model_uri` as a new version of `name`, wait until READY, then tag (and describe) it.

    Returns:
        The READY ModelVersion.
    """
    import mlflow

    ensure_registered_model(client, name)
    # await_registration_for=0: we poll ourselves and fail loudly instead of warning.
    mv = mlflow.register_model(model_uri, name, await_registration_for=0)
    mv = wait_until_ready(client, name, mv.version)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    if description:
        client.update_model_version(name, mv.version, description=description)
    return mv


def alias_holder(client, name: str, alias: str) -> str | None:
    """The version the alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@contextlib.contextmanager
def alias_lock(client, name: str, alias: str, wait_s: float = 300.0, ttl_s: float = 600.0):
    """Hold the promotion lock of `name@alias` (see the module docstring).

    Raises:
        JobError: another holder kept it for more than `wait_s`.
    """
    from mlflow.exceptions import MlflowException

    lock = f"{name}--{alias}--{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    deadline = time.time() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"owner": owner, "acquired_at": str(time.time())},
                description=f"transient: jobs.promote holds the {alias!r} alias of {name!r}; deleted when done")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        _break_if_stale(client, lock, ttl_s)
        if time.time() > deadline:
            raise JobError(f"another promotion of {name}@{alias} holds the lock {lock!r}; if no promotion is running, "
                           f"delete that registered model")
        time.sleep(0.3)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _break_if_stale(client, lock: str, ttl_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    if time.time() - float(held.tags.get("acquired_at", "0")) > ttl_s:
        print(f"breaking stale promotion lock {lock} held by {held.tags.get('owner')}", file=sys.stderr)
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


# -- choosing and scoring ----------------------------------------------------------------------------

def eval_key(metric: str) -> str:
    """`val/psnr_y` (a training metric) -> `psnr_y` (the key jobs.evaluate computes)."""
    return metric.split("/")[-1]


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
    from jobs.evaluate import build_lpips

    lpips, why = build_lpips(weights_path)
    if lpips is None:
        raise JobError(f"--metric {key} needs LPIPS: {why} (pass --lpips-weights)")
    return lpips


def score(spec_or_run, data: str, args, workdir: Path, lpips=None) -> tuple[dict[str, float], object]:
    """Held-out means of a run's generator or of a model URI, and the ModelSource it came from."""
    from gan_core.models import load_generator
    from jobs.evaluate import evaluate_generator, load_eval_images, pick_device
    from jobs.model_source import resolve_model, run_generator

    source = (resolve_model(spec_or_run, workdir) if isinstance(spec_or_run, str)
              else run_generator(spec_or_run, workdir))
    device = pick_device(args.device)
    try:
        generator = load_generator(source.path, device=device)
    except ValueError as err:
        raise JobError(f"{source.spec}: {err}") from err
    images = [img for _, img in load_eval_images(data, args.max_images, args.crop)]
    return evaluate_generator(generator, images, int(generator.scale), device, lpips), source


def decide(candidate: float, holder: float | None, holder_version: str | None, args,
           maximize: bool) -> tuple[bool, str]:
    """(promote?, reason) for the candidate's value against the alias holder's."""
    if holder is None:
        return True, f"no version holds @{args.alias} yet"
    margin = candidate - holder if maximize else holder - candidate
    verdict = (f"{args.metric} {candidate:.4f} vs {holder:.4f} of version {holder_version} "
               f"(improvement {margin:+.4f}, required > {args.min_improvement:g})")
    if margin > args.min_improvement:
        return True, f"beats version {holder_version}: {verdict}"
    return False, f"does not beat version {holder_version}: {verdict}"


# -- the two commands --------------------------------------------------------------------------------

def rollback(client, args) -> dict:
    """Point the alias at an existing READY version."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(args.registered_model, str(args.version))
    except MlflowException as err:
        raise JobError(f"{args.registered_model} version {args.version}: {err.message}") from err
    if mv.status != "READY":
        raise JobError(f"{args.registered_model} version {args.version} is {mv.status}, not READY")
    with alias_lock(client, args.registered_model, args.alias, wait_s=args.lock_wait, ttl_s=args.lock_ttl):
        previous = alias_holder(client, args.registered_model, args.alias)
        client.set_registered_model_alias(args.registered_model, args.alias, mv.version)
    client.set_model_version_tag(args.registered_model, mv.version, "promotion.rollback",
                                 f"@{args.alias} moved from version {previous} to {mv.version} at {time.ctime()}")
    print(f"{args.registered_model}@{args.alias}: version {previous} -> {mv.version} (rollback)")
    return {"decision": "rollback", "version": mv.version, "previous": previous}


def promote(client, args) -> dict:
    """Steps 1-4 of the module docstring; returns the decision and its numbers."""
    from jobs.evaluate import describe_evaluation

    maximize = higher_is_better(args.metric, args.mode)
    key, name, alias = eval_key(args.metric), args.registered_model, args.alias
    lpips = metric_lpips(key, args.lpips_weights)  # fail fast when the metric cannot be computed here
    run = best_candidate(client, args.experiment, args.metric, maximize, args.run_id)
    run_id = run.info.run_id
    print(f"candidate: run {run_id} ({run.info.run_name}), {args.metric} = {run.data.metrics.get(args.metric)}")
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
        ours, source = score(run, data, args, Path(tmp) / "candidate", lpips)
        if key not in ours:
            raise JobError(f"--metric {args.metric}: evaluation computes {sorted(ours)}, not {key!r}")
        baseline = f" (bicubic {ours['bicubic_' + key]:.4f})" if "bicubic_" + key in ours else ""
        print(f"held-out {key} on {data}: candidate {ours[key]:.4f}{baseline}")
        scored: dict[str, float] = {}  # version -> its value on these same images

        def judge(holder: str | None) -> tuple[bool, str]:
            if holder is not None and holder not in scored:
                spec = f"models:/{name}/{holder}"
                scored[holder] = score(spec, data, args, Path(tmp) / f"v{holder}", lpips)[0][key]
            return decide(ours[key], scored.get(holder), holder, args, maximize)

        holder = alias_holder(client, name, alias)
        promote_it, reason = judge(holder)
        if args.dry_run:
            print(f"dry run: would {'promote' if promote_it else 'refuse'}: {reason}")
            return {"decision": "dry-run", "would_promote": promote_it, "reason": reason, "run_id": run_id,
                    "candidate": ours[key], "holder": holder}
        if pending:
            mv = wait_until_ready(client, name, pending[0].version)
            print(f"resuming the undecided {name} version {mv.version}")
        else:
            model_uri = source.model_uri or _log_model_from_checkpoint(run_id, source.path, Path(tmp))
            mv = register_version(client, name, model_uri, {
                **{f"eval.{k}": f"{v:.6g}" for k, v in ours.items()},
                "eval.data": str(data), "source_run_id": run_id, "promotion.decision": "pending"},
                description=describe_evaluation(ours, data, run_id))
            print(f"registered {name} version {mv.version} (READY) from {model_uri}")
        # 4. Compare-and-set: the alias only moves if its holder is still the one we compared against;
        #    otherwise the new holder is scored (outside the lock: that can take minutes) and we try again.
        while True:
            with alias_lock(client, name, alias, wait_s=args.lock_wait, ttl_s=args.lock_ttl):
                current = alias_holder(client, name, alias)
                if current == holder:
                    _record_decision(client, args, mv.version, promote_it, reason, ours[key], holder, scored)
                    if promote_it:
                        client.set_registered_model_alias(name, alias, mv.version)
                    break
            print(f"@{alias} moved from version {holder} to {current} meanwhile; comparing against it")
            holder = current
            promote_it, reason = judge(holder)
    _log_heldout(client, run_id, ours)
    decision = "promoted" if promote_it else "refused"
    outcome = f"@{alias} -> version {mv.version}" if promote_it else f"@{alias} stays on version {holder}"
    print(f"{decision.upper()}: {name} version {mv.version} {reason}; {outcome}")
    return {"decision": decision, "reason": reason, "version": mv.version, "run_id": run_id, "candidate": ours[key],
            "holder": holder, "holder_value": scored.get(holder)}


def _record_decision(client, args, version: str, promoted: bool, reason: str, value: float, holder: str | None,
                     scored: dict[str, float]) -> None:
    """The decision and its numbers as tags on the version (written before the alias moves)."""
    name = args.registered_model
    tags = {"promotion.decision": "promoted" if promoted else "refused", "promotion.reason": reason,
            "promotion.alias": args.alias, "promotion.metric": args.metric,
            "promotion.candidate_value": f"{value:.6g}", "promotion.compared_to_version": holder or "none",
            "promotion.holder_value": f"{scored[holder]:.6g}" if holder else "none",
            "promotion.min_improvement": str(args.min_improvement), "promotion.time": time.ctime()}
    for tag, text in tags.items():
        client.set_model_version_tag(name, version, tag, text)
    if promoted and holder:
        client.set_model_version_tag(name, holder, "promotion.superseded_by", version)


def _log_heldout(client, run_id: str, means: dict[str, float]) -> None:
    """The held-out numbers also go to the candidate run, next to its training curves."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"heldout/{k}", float(v), now, 0) for k, v in means.items()])


def _log_model_from_checkpoint(run_id: str, checkpoint: Path, tmp: Path) -> str:
    """A run with a checkpoint but no logged model: log the slim generator into it as a pyfunc model."""
    import mlflow

    from gan_core.checkpoint import export_generator
    from jobs.pyfunc_model import log_generator_model

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
    parser.add_argument("--metric", default="val/psnr_y", help="run metric that ranks candidates; its last part "
                        "(psnr_y) is the held-out metric that decides")
    parser.add_argument("--mode", choices=("max", "min"), help="default: min for LPIPS, else max")
    parser.add_argument("--min-improvement", type=float, default=0.0, help="required margin, in metric units")
    parser.add_argument("--run-id", help="consider this run instead of the experiment's best")
    parser.add_argument("--data", help="held-out HR images (folder or shards); default: the run's data.val")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--crop", type=int, help="centre-crop held-out images to this side (quick CPU runs)")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--lpips-weights",
                        help="AlexNet backbone for LPIPS metrics (else $GAN_CORE_WEIGHTS_DIR, hub cache)")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and print the decision; register nothing")
    parser.add_argument("--lock-wait", type=float, default=300.0, help="seconds to wait for a concurrent promotion")
    parser.add_argument("--lock-ttl", type=float, default=600.0, help="a lock older than this is from a crashed job")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    if args.version is None and not (args.experiment or args.run_id):
        parser.error("give --experiment (or --run-id) to promote, or --version to roll back")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Promote or roll back; returns the decision (also printed)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    return rollback(client, args) if args.version else promote(client, args)


if __name__ == "__main__":
    run_main(main)
