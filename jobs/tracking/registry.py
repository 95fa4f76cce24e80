"""The MLflow Model Registry: registering a version and waiting for it, the alias holder, the lock
under which an alias moves, and the promotion gate every alias move goes through.

The lock is a compare-and-set made from what the registry guarantees: creating a registered model
whose name exists fails atomically on the server, so the job that creates `<model>--<alias>--lock`
owns the alias until it deletes it. A lock older than its time-to-live (a crashed job) is broken.

The gate (`gate_promotion`, applied by `gated_alias_move` for jobs.promote and jobs.import_weights)
has absolute floors, which hold even when no version holds the alias yet:
  - finite: no held-out image may come out with a NaN or Inf (scoring would count it as a black image);
  - gain: the task's metric must beat the task's baseline on the same images by more than `min_gain`
    (default 0), as the task's `gain` says (gan_core.tasks): PSNR-Y over bicubic (sr, in dB), PSNR-Y over
    the input itself (denoise, lowlight), Qabf over the average of the infrared and visible images (fusion);
and, against the holder scored on the same images:
  - margin: the deciding metric improves by more than `min_improvement`;
  - no regression: PSNR-Y and SSIM-Y at least the holder's, LPIPS not higher, when both have them.
Only an explicit rollback (jobs.promote --version) moves an alias without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import sys
import time
from collections.abc import Callable

from jobs.cli import JobError

LOCK_SUFFIX = "lock"
NONFINITE_KEY = "nonfinite_images"  # gan_core.scoring.NONFINITE_KEY (not imported: this module loads no torch)
# Metrics no candidate may be worse on than the holder: key -> higher is better.
NO_REGRESSION = {"psnr_y": True, "ssim_y": True, "lpips": False}
# A task's (gain key, metric, baseline key): gan_core.tasks' `Task.gain` (not imported: torch). Super-resolution's:
SR_GAIN = ("gain_psnr_y", "psnr_y", "bicubic_psnr_y")
# How a gain's metric reads in messages: key -> (name, unit).
GAIN_UNITS = {"psnr_y": ("PSNR-Y", " dB"), "qabf": ("Qabf", "")}
# The lines of a version's description, in this order: key -> (name, format, unit).
DESCRIBED = {"psnr_y": ("PSNR-Y", ".3f", " dB"), "ssim_y": ("SSIM-Y", ".4f", ""), "qabf": ("Qabf", ".4f", ""),
             "mi": ("MI", ".3f", " bits"), "en": ("EN", ".3f", " bits"), "sd": ("SD", ".2f", ""),
             "sf": ("SF", ".2f", "")}


def gain_baseline(gain: tuple[str, str, str]) -> str:
    """The baseline's name of a task's gain: ("gain_qabf", "qabf", "average_qabf") -> "average"."""
    _, metric, baseline_key = gain
    return baseline_key.removesuffix(f"_{metric}")


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


def describe_evaluation(means: dict[str, float], data: str, run_id: str | None,
                        gain: tuple[str, str, str] = SR_GAIN) -> str:
    """One line for the version's description: the held-out numbers against the task's baseline (`gain`)."""
    baseline = gain_baseline(gain)
    parts = [f"{name} {means[key]:{fmt}}{unit} ({baseline} {means[f'{baseline}_{key}']:{fmt}})"
             for key, (name, fmt, unit) in DESCRIBED.items() if key in means and f"{baseline}_{key}" in means]
    text = f"held-out {data} ({int(means.get('images', 0))} images): " + ", ".join(parts)
    if "lpips" in means:
        text += f", LPIPS {means['lpips']:.4f}"
    if means.get(NONFINITE_KEY):
        text += f"; NON-FINITE outputs (NaN/Inf) on {means[NONFINITE_KEY]:g} images, scored as black"
    return text + (f"; from run {run_id}" if run_id else "")


# -- the promotion gate ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GateDecision:
    """What `gate_promotion` decided and the numbers it decided on (recorded as `promotion.*` tags)."""

    promote: bool
    reason: str  # one line with the numbers; every failed check, separated by "; "
    failed: tuple[str, ...]  # the failed checks: "finite", "gain", "margin", "psnr_y", "ssim_y", "lpips"
    metric: str
    candidate_value: float
    holder_version: str | None
    holder_value: float | None
    min_improvement: float
    min_gain: float  # in the gain's units (dB for PSNR-Y)
    gain: float
    gain_key: str  # gain_psnr_y, gain_qabf
    nonfinite_images: float

    def tags(self, alias: str) -> dict[str, str]:
        """The `promotion.*` tags of the candidate version."""
        return {"promotion.decision": "promoted" if self.promote else "refused", "promotion.reason": self.reason,
                "promotion.failed_checks": ",".join(self.failed) or "none",
                "promotion.alias": alias, "promotion.metric": self.metric,
                "promotion.candidate_value": f"{self.candidate_value:.6g}",
                "promotion.compared_to_version": self.holder_version or "none",
                "promotion.holder_value": "none" if self.holder_value is None else f"{self.holder_value:.6g}",
                "promotion.min_improvement": str(self.min_improvement),
                "promotion.min_gain": str(self.min_gain),
                f"promotion.{self.gain_key}": f"{self.gain:.6g}",
                "promotion.nonfinite_images": f"{self.nonfinite_images:g}",
                "promotion.time": time.ctime()}


def gate_promotion(candidate: dict[str, float], holder: dict[str, float] | None, holder_version: str | None, *,
                   alias: str, metric: str = "psnr_y", maximize: bool = True, min_improvement: float = 0.0,
                   min_gain: float = 0.0, gain: tuple[str, str, str] = SR_GAIN) -> GateDecision:
    """May the candidate take `alias` from its holder? The checks are in the module docstring.

    Args:
        candidate: held-out means of the candidate (`gan_core.scoring.evaluate_generator_checked`).
        holder: the holder's means on the same images, or None when no version holds the alias.
        holder_version: the holder's version (for the reason), or None.
        alias: the alias at stake (for the reason).
        metric: the deciding metric; its last part (`val/psnr_y` -> `psnr_y`) is the key in the means.
        maximize: whether higher `metric` is better.
        min_improvement: required margin on `metric` over the holder, in metric units.
        min_gain: required gain of the task's metric over its baseline, in the metric's units (dB for PSNR-Y).
        gain: the task's (gain key, metric, baseline key), `Task.gain`: super-resolution's by default.

    Returns:
        The decision; `promote` only when every check passed.

    Raises:
        KeyError: `metric` is not in the candidate's means.
    """
    key = metric.split("/")[-1]
    value = candidate[key]
    # Means without the count were never checked for NaN outputs: that is a refusal, not a pass.
    nonfinite = candidate.get(NONFINITE_KEY, math.nan)
    gain_key, gain_metric, baseline_key = gain
    gain_name, unit = GAIN_UNITS.get(gain_metric, (gain_metric, ""))
    baseline = gain_baseline(gain)
    gain_value = candidate.get(gain_key, math.nan)
    nan_metrics = sorted(k for k in {key, gain_key, *NO_REGRESSION}
                         if k in candidate and not math.isfinite(candidate[k]))
    failed, notes = [], []
    if math.isnan(nonfinite):
        failed.append("finite")
        notes.append("the evaluation did not count non-finite outputs")
    elif nonfinite > 0:
        failed.append("finite")
        notes.append(f"outputs are not finite (NaN/Inf) on {nonfinite:g} of {candidate.get('images', 0):g} "
                     f"held-out images")
    elif nan_metrics:
        failed.append("finite")
        notes.append(f"non-finite {', '.join(nan_metrics)}")
    # Written as `not >` so that a NaN gain fails too.
    if not gain_value > min_gain:
        failed.append("gain")
        notes.append(f"does not beat {baseline}: {gain_name} {candidate.get(gain_metric, math.nan):.4f} vs "
                     f"{candidate.get(baseline_key, math.nan):.4f} (gain {gain_value:+.4f}{unit}, "
                     f"required > {min_gain:g})")
    holder_value = None
    if holder is not None:
        holder_value = holder[key]
        margin = value - holder_value if maximize else holder_value - value
        if not math.isfinite(holder_value):
            margin = math.inf  # a broken holder (registered before this gate) is beaten by any finite model
        verdict = (f"{metric} {value:.4f} vs {holder_value:.4f} of version {holder_version} "
                   f"(improvement {margin:+.4f}, required > {min_improvement:g})")
        if not margin > min_improvement:
            failed.append("margin")
            notes.append(f"does not beat version {holder_version}: {verdict}")
        compared = []
        for name, higher_better in NO_REGRESSION.items():
            ours, theirs = candidate.get(name), holder.get(name)
            # A holder value that is missing or NaN (a holder from before this gate) constrains nothing.
            if ours is None or theirs is None or not math.isfinite(theirs):
                continue
            compared.append(name)
            if name == key and "margin" in failed:
                continue  # already said, with the numbers
            if (ours < theirs) if higher_better else (ours > theirs):
                failed.append(name)
                notes.append(f"worse than version {holder_version} on {name}: {ours:.4f} vs {theirs:.4f}")
    if failed:
        reason = "; ".join(notes)
    elif holder is None:
        reason = (f"no version holds @{alias} yet; finite outputs, {gain_name} gain over {baseline} "
                  f"{gain_value:+.4f}{unit} (required > {min_gain:g})")
    else:
        reason = f"beats version {holder_version}: {verdict}; no worse on {', '.join(compared)}"
    return GateDecision(promote=not failed, reason=reason, failed=tuple(failed), metric=metric,
                        candidate_value=value, holder_version=holder_version, holder_value=holder_value,
                        min_improvement=min_improvement, min_gain=min_gain, gain=gain_value, gain_key=gain_key,
                        nonfinite_images=nonfinite)


def gated_alias_move(client, name: str, alias: str, version: str, candidate: dict[str, float],
                     score_version: Callable[[str], dict[str, float]], *, metric: str = "psnr_y",
                     maximize: bool = True, min_improvement: float = 0.0, min_gain: float = 0.0,
                     gain: tuple[str, str, str] = SR_GAIN, lock_wait_s: float = 300.0,
                     lock_ttl_s: float = 600.0) -> GateDecision:
    """Point `name@alias` at `version` if, and only if, `gate_promotion` passes against the holder.

    A compare-and-set: the holder is scored outside the lock (that can take minutes); under the lock the
    holder is read again, and if another job moved the alias meanwhile, the new holder is scored and the
    gate rerun. The decision is written as `promotion.*` tags before the alias moves.

    Args:
        client: an MlflowClient.
        name, alias, version: the registered model, the alias, the (READY) candidate version.
        candidate: the candidate's held-out means (with `nonfinite_images`).
        score_version: a version -> its means on the same held-out images (callers cache it).
        metric, maximize, min_improvement, min_gain, gain: as in `gate_promotion`.
        lock_wait_s, lock_ttl_s: as in `alias_lock`.

    Returns:
        The decision against the holder the alias was finally compared with.
    """
    holder = alias_holder(client, name, alias)
    while True:
        decision = gate_promotion(candidate, score_version(holder) if holder else None, holder, alias=alias,
                                  metric=metric, maximize=maximize, min_improvement=min_improvement,
                                  min_gain=min_gain, gain=gain)
        with alias_lock(client, name, alias, wait_s=lock_wait_s, ttl_s=lock_ttl_s):
            current = alias_holder(client, name, alias)
            if current == holder:
                for tag, text in decision.tags(alias).items():
                    client.set_model_version_tag(name, version, tag, text)
                if decision.promote:
                    client.set_registered_model_alias(name, alias, version)
                    if holder:
                        client.set_model_version_tag(name, holder, "promotion.superseded_by", version)
                return decision
        print(f"@{alias} moved from version {holder} to {current} meanwhile; comparing against it")
        holder = current


def recorded_nonfinite(tags: dict[str, str]) -> str | None:
    """Why a version's recorded evaluation (`eval.*` tags) shows non-finite outputs, or None.

    Versions registered before `eval.nonfinite_images` existed only show it through a NaN metric.
    """
    count = tags.get(f"eval.{NONFINITE_KEY}")
    if count is not None and float(count) != 0:
        return f"its evaluation on {tags.get('eval.data', 'held-out data')} had non-finite outputs on {count} images"
    nan = sorted(k for k, v in tags.items() if k.startswith("eval.") and k != "eval.data" and _is_nan(v))
    return f"its recorded evaluation has non-finite {', '.join(nan)}" if nan else None


def _is_nan(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False
