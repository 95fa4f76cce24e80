"""Bring published ESRGAN / Real-ESRGAN weights (BasicSR format) into the registry as a model version.

Locally:
    python -m jobs.import_weights --basicsr weights/RealESRGAN_x4plus.pth --arch basicsr --registered-model esrgan-x4 \
        [--data data/demo/val] [--alias baseline --min-gain-db -1.0]
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.import_weights --basicsr /shared/weights/ESRGAN_x4.pth --arch basicsr --registered-model esrgan-x4 \
        --tracking-uri http://<head>:5000

The file (plain state dict, or `params_ema` / `params`; or a safetensors file) is checked by loading it
into RRDBNet, whose sizes are read from the weights' shapes. What shapes cannot tell (res_scale, an
upsampling skip) comes from the file's metadata (our safetensors) or from --arch: `--arch basicsr` for
BasicSR / Real-ESRGAN releases (res_scale 0.2, no skip), `--arch res_scale=0.3` for weights trained
otherwise. Without either, the import stops instead of guessing; it is stored as a generator file (one set of
weights, the config that rebuilds the network) inside a pyfunc model logged to a run of --experiment,
then registered. With --data, the held-out evaluation is attached (`eval.*` tags) so that
`jobs.promote` and users can compare against it. The version is tagged with the file's SHA-256:
importing the same file twice returns the existing version. Nothing is downloaded: fetch the file
yourself (e.g. from the Real-ESRGAN releases page) and pass its path.

With --alias (which needs --data), the alias moves only through the same promotion gate and registry
lock as `jobs.promote` (`jobs.tracking.registry.gated_alias_move`): finite outputs on every held-out
image, a PSNR-Y gain over bicubic above --min-gain-db (default 0 dB; GAN-trained weights such as
Real-ESRGAN's often score below bicubic, so a baseline alias for them needs a negative floor), and no
regression against the alias holder. When the gate refuses, the version is still registered (with its
`promotion.*` tags), the alias stays where it was, and the command exits with status 1; usage errors
(missing file, --alias without --data) exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from gan_core.portable import ARCH_HELP
from jobs.cli import JobError, run_main
from jobs.tracking.server import TRACKING_HELP

DEFAULT_EXPERIMENT = "imported-weights"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_basicsr(path: Path, out_file: Path, use_ema: bool = True, arch: str | None = None) -> tuple[Path, dict]:
    """Check a BasicSR .pth by loading it, and write it as a generator file (`gan_core.checkpoint.save_generator`).

    Args:
        path: the .pth file.
        out_file: where the slim checkpoint goes.
        use_ema: prefer `params_ema` over `params` when the file has both.
        arch: what plain weights cannot tell (`gan_core.portable.parse_arch`); files with metadata need none.

    Returns:
        (out_file, the generator's config: name and every constructor argument).

    Raises:
        JobError: missing file, or not RRDBNet weights (the message says what was found).
    """
    from gan_core.checkpoint import load_generator, save_generator
    from gan_core.models import generator_config

    try:
        generator = load_generator(path, use_ema=use_ema, arch=arch)
    except FileNotFoundError as err:
        raise JobError(f"--basicsr {path}: no such file") from err
    except ValueError as err:
        raise JobError(f"--basicsr {err}") from err
    return save_generator(out_file, generator), generator_config(generator)


def existing_import(client, name: str, digest: str):
    """The version of `name` already imported from a file with this SHA-256, or None."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("source_sha256") == digest:
            return mv
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.import_weights", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--basicsr", required=True,
                        help="RRDBNet weights: a BasicSR-format .pth, or a .safetensors file")
    parser.add_argument("--arch", help="for plain weights (a BasicSR .pth): " + ARCH_HELP)
    parser.add_argument("--registered-model", required=True)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="the run that holds the logged model")
    parser.add_argument("--use-params", action="store_true", help="take `params` even when `params_ema` exists")
    parser.add_argument("--data", help="held-out HR images: evaluate and attach the numbers to the version")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--alias", help="also point this alias at the new version (e.g. baseline) if it passes "
                        "the promotion gate against the holder; needs --data")
    parser.add_argument("--min-gain-db", type=float, default=0.0,
                        help="with --alias: required held-out PSNR-Y gain over bicubic, in dB (default 0)")
    parser.add_argument("--min-improvement", type=float, default=0.0,
                        help="with --alias: required PSNR-Y margin over the alias holder, in dB")
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Import the weights; returns {"version", "run_id", "generator", "metrics", "decision"}.

    "decision" is "promoted" or "refused" with --alias (the gate's reason is in "reason"), else None.

    Raises:
        JobError: a usage error (missing file, --alias without --data, not RRDBNet weights, bad --data).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.tracking.model_source import resolve_model
    from jobs.tracking.pyfunc import log_generator_model
    from jobs.tracking.registry import (
        describe_evaluation,
        gated_alias_move,
        register_version,
    )
    from jobs.tracking.server import connect

    args = parse_args(argv)
    path = Path(args.basicsr)
    if not path.is_file():
        raise JobError(f"--basicsr {path}: no such file")
    if args.alias and not args.data:
        raise JobError(f"--alias {args.alias} needs --data: the alias only moves to weights that pass the "
                       f"promotion gate on held-out images")
    client = MlflowClient(connect(args.tracking_uri))
    digest = sha256(path)
    found = existing_import(client, args.registered_model, digest)
    if found is not None:
        print(f"{path} (sha256 {digest[:12]}) is already {args.registered_model} version {found.version}"
              + (f"; @{args.alias} not moved" if args.alias else ""))
        return {"version": found.version, "run_id": found.run_id, "existing": True, "decision": None}
    with tempfile.TemporaryDirectory(prefix="import-") as tmp:
        slim, kwargs = convert_basicsr(path, Path(tmp) / "generator.pt", use_ema=not args.use_params, arch=args.arch)
        metrics, images = {}, []
        if args.data:
            from gan_core.scoring import load_eval_images

            try:
                images = [img for _, img in load_eval_images(args.data, args.max_images, args.crop)]
            except FileNotFoundError as err:
                raise JobError(f"--data {err}") from err
            metrics = _evaluate(slim, images)
        mlflow.set_experiment(args.experiment)
        with mlflow.start_run(run_name=f"import-{path.stem}", tags={"source": "basicsr"}) as run:
            mlflow.log_params({**{f"generator.{k}": v for k, v in kwargs.items() if k != "name"},
                               "source_file": str(path.resolve()),
                               "source_sha256": digest,
                               "weights": "params" if args.use_params else "params_ema|params"})
            if metrics:
                mlflow.log_metrics({f"heldout/{k}": v for k, v in metrics.items()})
            info = log_generator_model(slim, name="generator")
        tags = {"source": "basicsr", "source_file": path.name, "source_sha256": digest,
                **{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}}
        if args.data:
            tags["eval.data"] = str(args.data)
        description = (f"imported from {path.name} (BasicSR format); "
                       + (describe_evaluation(metrics, args.data, None) if metrics else "not evaluated"))
        mv = register_version(client, args.registered_model, info.model_uri, tags, description=description)
        arch = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "name")
        print(f"imported {path.name} as {args.registered_model} version {mv.version} (READY): RRDBNet({arch})")
        if metrics:
            print(f"held-out PSNR-Y {metrics['psnr_y']:.3f} dB (bicubic {metrics['bicubic_psnr_y']:.3f}) "
                  f"on {args.data}")
        result = {"version": mv.version, "run_id": run.info.run_id, "generator": kwargs, "metrics": metrics,
                  "existing": False, "decision": None}
        if args.alias:
            holders: dict[str, dict[str, float]] = {}

            def score_version(version: str) -> dict[str, float]:
                # The holder, on the same images (any generator format the registry holds).
                if version not in holders:
                    source = resolve_model(f"models:/{args.registered_model}/{version}", Path(tmp) / f"v{version}")
                    holders[version] = _evaluate(source.path, images)
                return holders[version]

            verdict = gated_alias_move(client, args.registered_model, args.alias, mv.version, metrics, score_version,
                                       metric="psnr_y", min_improvement=args.min_improvement,
                                       min_gain=args.min_gain_db)
            if verdict.promote:
                print(f"PROMOTED: {args.registered_model}@{args.alias} -> version {mv.version}: {verdict.reason}")
            else:
                holder = verdict.holder_version
                print(f"REFUSED: {args.registered_model} version {mv.version}: {verdict.reason}; @{args.alias} "
                      + (f"stays on version {holder}" if holder else "stays unset"))
            result.update(decision="promoted" if verdict.promote else "refused", reason=verdict.reason)
    return result


def _evaluate(generator_file: Path, images: list) -> dict[str, float]:
    """Held-out means of a generator file, with `nonfinite_images` (what the promotion gate reads)."""
    from gan_core.checkpoint import load_generator
    from gan_core.scoring import evaluate_generator_checked, pick_device

    device = pick_device()
    return evaluate_generator_checked(load_generator(generator_file, device=device), images, device)


def cli(argv: list[str] | None = None) -> None:
    """The command line: `main`, then exit status 1 when the gate refused to move --alias."""
    if main(argv)["decision"] == "refused":
        sys.exit(1)


if __name__ == "__main__":
    run_main(cli)
