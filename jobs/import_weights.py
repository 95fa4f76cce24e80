"""Bring published ESRGAN / Real-ESRGAN weights (BasicSR format) into the registry as a model version.

Locally:
    python -m jobs.import_weights --basicsr weights/RealESRGAN_x4plus.pth --registered-model esrgan-x4 \
        [--data data/demo/val] [--alias baseline]
On a cluster:
    ray job submit --address http://<head>:8265 --working-dir . -- \
        python -m jobs.import_weights --basicsr /shared/weights/ESRGAN_x4.pth --registered-model esrgan-x4 \
        --tracking-uri http://<head>:5000

The file (plain state dict, or `params_ema` / `params`) is checked by loading it into RRDBNet, whose
architecture is read from the weights' shapes; it is stored as a slim gan_core checkpoint (one set of
weights, the config that rebuilds the network) inside a pyfunc model logged to a run of --experiment,
then registered. With --data, the held-out evaluation is attached (`eval.*` tags) so that
`jobs.promote` and users can compare against it. The version is tagged with the file's SHA-256:
importing the same file twice returns the existing version. Nothing is downloaded: fetch the file
yourself (e.g. from the Real-ESRGAN releases page) and pass its path.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from gan_core.checkpoint import CHECKPOINT_FORMAT
from jobs.common import JobError, check_tracking_server, resolve_tracking_uri, run_main

DEFAULT_EXPERIMENT = "imported-weights"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_basicsr(path: Path, out_file: Path, use_ema: bool = True) -> tuple[Path, dict]:
    """Check a BasicSR .pth by loading it, and write it as a slim gan_core checkpoint.

    Args:
        path: the .pth file.
        out_file: where the slim checkpoint goes.
        use_ema: prefer `params_ema` over `params` when the file has both.

    Returns:
        (out_file, the RRDBNet constructor arguments).

    Raises:
        JobError: missing file, or not RRDBNet weights (the message says what was found).
    """
    from gan_core.export import generator_kwargs
    from gan_core.models import load_generator

    try:
        generator = load_generator(path, use_ema=use_ema)
    except FileNotFoundError as err:
        raise JobError(f"--basicsr {path}: no such file") from err
    except ValueError as err:
        raise JobError(f"--basicsr {err}") from err
    kwargs = generator_kwargs(generator)
    payload = {"format": CHECKPOINT_FORMAT, "config": {"generator": {"name": "rrdb", **kwargs}}, "step": 0,
               "generator": generator.state_dict(), "generator_ema": None}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out_file)
    return out_file, kwargs


def existing_import(client, name: str, digest: str):
    """The version of `name` already imported from a file with this SHA-256, or None."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("source_sha256") == digest:
            return mv
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.import_weights", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--basicsr", required=True, help="BasicSR-format RRDBNet weights (.pth)")
    parser.add_argument("--registered-model", required=True)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="the run that holds the logged model")
    parser.add_argument("--use-params", action="store_true", help="take `params` even when `params_ema` exists")
    parser.add_argument("--data", help="held-out HR images: evaluate and attach the numbers to the version")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--alias", help="also point this alias at the new version (e.g. baseline); "
                        "use jobs.promote for the gated champion alias")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Import the weights; returns {"version", "run_id", "generator", "metrics"}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import describe_evaluation, evaluate_generator, load_eval_images, pick_device
    from jobs.promote import register_version
    from jobs.pyfunc_model import log_generator_model

    args = parse_args(argv)
    path = Path(args.basicsr)
    if not path.is_file():
        raise JobError(f"--basicsr {path}: no such file")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    digest = sha256(path)
    found = existing_import(client, args.registered_model, digest)
    if found is not None:
        print(f"{path} (sha256 {digest[:12]}) is already {args.registered_model} version {found.version}")
        return {"version": found.version, "run_id": found.run_id, "existing": True}
    with tempfile.TemporaryDirectory(prefix="import-") as tmp:
        slim, kwargs = convert_basicsr(path, Path(tmp) / "generator.pt", use_ema=not args.use_params)
        metrics = {}
        if args.data:
            from gan_core.models import load_generator

            images = [img for _, img in load_eval_images(args.data, args.max_images, args.crop)]
            device = pick_device(None)
            metrics = evaluate_generator(load_generator(slim, device=device), images, kwargs["scale"], device)
        mlflow.set_experiment(args.experiment)
        with mlflow.start_run(run_name=f"import-{path.stem}", tags={"source": "basicsr"}) as run:
            mlflow.log_params({**{f"generator.{k}": v for k, v in kwargs.items()}, "source_file": str(path.resolve()),
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
    if args.alias:
        client.set_registered_model_alias(args.registered_model, args.alias, mv.version)
    arch = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(f"imported {path.name} as {args.registered_model} version {mv.version} (READY): RRDBNet({arch})")
    if metrics:
        print(f"held-out PSNR-Y {metrics['psnr_y']:.3f} dB (bicubic {metrics['bicubic_psnr_y']:.3f}) on {args.data}")
    if args.alias:
        print(f"{args.registered_model}@{args.alias} -> version {mv.version}")
    return {"version": mv.version, "run_id": run.info.run_id, "generator": kwargs, "metrics": metrics,
            "existing": False}


if __name__ == "__main__":
    run_main(main)
