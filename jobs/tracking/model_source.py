"""`--model` for every job: a checkpoint dir, a .pth, or an MLflow URI, resolved to a local generator file.

Accepted forms:
    path/to/checkpoint_dir            a complete checkpoint folder (checkpoint.pt; its manifest checks out)
    path/to/run_dir                   a Ray Train run folder: its newest complete checkpoint_* folder
    path/to/checkpoint.pt | x.pth     our checkpoint, a slim export, or BasicSR / Real-ESRGAN weights
    s3://bucket/prefix/...            any of the three above on S3 (or another pyarrow file system URI:
                                      gs://, hdfs://): downloaded; endpoint and keys from the standard
                                      AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
    runs:/<run_id>                    the run's logged model (tag `model_uri`), else its checkpoint
                                      (tag `checkpoint_location`)
    runs:/<run_id>/generator          a model logged in that run under that name
    models:/<name>@<alias>            a registered model by alias (e.g. models:/esrgan-x4@champion)
    models:/<name>/<version>          a registered model version
    models:/m-<id>                    a logged model (what training writes in the `model_uri` tag)

A run's checkpoint is picked by `gan_core.manifest.latest_complete_checkpoint`: a newer checkpoint that
a full disk or a killed worker left half-copied is skipped, with a line on stderr naming it. On S3 the same
rules hold (`remote_checkpoint_file`): checkpoint folders are downloaded newest first, one at a time, and
checked against their manifests until one is complete.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

from gan_core.checkpoint import CHECKPOINT_FILE
from gan_core.manifest import checkpoint_problem, is_checkpoint_folder, latest_complete_checkpoint
from jobs.cli import JobError

MLFLOW_SCHEMES = ("runs:/", "models:/")
# What pyarrow.fs.FileSystem.from_uri reads (Ray Train writes run.storage_path=s3://... through it too).
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "abfs://", "abfss://")
MODEL_HELP = ("checkpoint dir | .pt/.pth | s3://... (a checkpoint or run folder) | runs:/<id>[/<name>] | "
              "models:/<name>@<alias> | models:/<name>/<N>")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a generator came from.

    Attributes:
        spec: what the user passed.
        path: a local file that `gan_core.checkpoint.load_generator` reads.
        run_id: the MLflow run it belongs to, when known.
        model_uri: the MLflow model URI, when it is a logged model.
    """

    spec: str
    path: Path
    run_id: str | None = None
    model_uri: str | None = None


def is_mlflow_uri(spec: str) -> bool:
    """True for runs:/ and models:/ URIs."""
    return spec.startswith(MLFLOW_SCHEMES)


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Checkpoint lives, as a path or URI that `--model` and `train.init_from` take.

    Ray's `Checkpoint.path` is relative to its file system: on S3 it reads `bucket/prefix/...`, without the
    scheme that says it is not a local folder.
    """
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    scheme = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://", "abfs": "abfs://"}.get(kind, "")
    return f"{scheme}{checkpoint.path}"


def is_remote_uri(spec: str) -> bool:
    """True for file-system URIs that pyarrow reads (s3://, gs://, hdfs://, ...)."""
    return spec.startswith(REMOTE_SCHEMES)


def resolve_model(spec: str, download_dir: str | Path) -> ModelSource:
    """Turn a `--model` value into a local generator file, downloading from MLflow when needed.

    Args:
        spec: see the module docstring.
        download_dir: where MLflow artifacts are downloaded (the caller owns and cleans it).

    Returns:
        The ModelSource; its `path` is a file.

    Raises:
        JobError: nothing at the path, an unknown URI, a run without a model, a missing alias.
    """
    if spec.startswith("runs:/"):
        return _from_run_uri(spec, Path(download_dir))
    if spec.startswith("models:/"):
        path = _download_pyfunc_generator(spec, Path(download_dir))
        return ModelSource(spec=spec, path=path, run_id=_model_run_id(spec), model_uri=spec)
    if is_remote_uri(spec):
        return ModelSource(spec=spec, path=remote_checkpoint_file(spec, Path(download_dir)))
    if "://" in spec or spec.startswith(("runs:", "models:")):
        raise JobError(f"--model {spec!r}: unknown URI; use a path, s3://..., runs:/<run_id>[/<name>], "
                       "models:/<name>@<alias> or models:/<name>/<version>")
    return ModelSource(spec=spec, path=local_checkpoint_file(Path(spec)))


def local_checkpoint_file(path: Path) -> Path:
    """The generator file for a local path: the file itself, `<dir>/checkpoint.pt` of a complete checkpoint
    folder, or that of the newest complete `checkpoint_*` folder under a Ray Train run folder (newer,
    incomplete ones are named on stderr and skipped).

    Raises:
        JobError: no such file or folder, an incomplete checkpoint folder (what is wrong with it), or a
            folder without a complete checkpoint.
    """
    if path.is_file():
        return path
    if not path.is_dir():
        raise JobError(f"--model {path}: no such file or folder (expected a checkpoint dir, .pt/.pth or MLflow URI)")
    if is_checkpoint_folder(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise JobError(f"--model {path}: incomplete checkpoint ({problem}); pass its run folder "
                           f"({path.parent}) to use the newest complete one")
        return path / CHECKPOINT_FILE
    try:
        return latest_complete_checkpoint(path, warn=_say) / CHECKPOINT_FILE
    except FileNotFoundError as err:
        raise JobError(f"--model {path}: {err}") from None


def _from_run_uri(spec: str, download_dir: Path) -> ModelSource:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id, _, name = spec[len("runs:/") :].partition("/")
    if not run_id:
        raise JobError(f"--model {spec!r}: no run id (expected runs:/<run_id>[/<model name>])")
    if name:
        path = _download_pyfunc_generator(spec, download_dir)
        return ModelSource(spec=spec, path=path, run_id=run_id, model_uri=spec)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise JobError(f"--model {spec!r}: no such run ({err.message})") from err
    return run_generator(run, download_dir, spec)


def run_generator(run, download_dir: Path, spec: str | None = None) -> ModelSource:
    """The generator of a training run: its logged model (tag `model_uri`), else its checkpoint
    folder (tag `checkpoint_location`).

    Raises:
        JobError: the run has neither, or the checkpoint is gone.
    """
    run_id = run.info.run_id
    spec = spec or f"runs:/{run_id}"
    tags = run.data.tags
    if tags.get("model_uri"):
        uri = tags["model_uri"]
        return ModelSource(spec=spec, path=_download_pyfunc_generator(uri, download_dir / run_id), run_id=run_id,
                           model_uri=uri)
    if tags.get("checkpoint_location") and is_remote_uri(tags["checkpoint_location"]):
        return ModelSource(spec=spec, path=remote_checkpoint_file(tags["checkpoint_location"], download_dir / run_id),
                           run_id=run_id)
    if tags.get("checkpoint_location"):
        location = Path(tags["checkpoint_location"])
        try:
            return ModelSource(spec=spec, path=local_checkpoint_file(location), run_id=run_id)
        except JobError as err:
            # A tag naming one checkpoint folder that was cut short: the run's newest complete one beside it.
            if not (location.name.startswith("checkpoint_") and location.parent.is_dir()):
                raise JobError(f"run {run_id}: checkpoint_location {location} is not readable here ({err})") from err
            try:
                folder = latest_complete_checkpoint(location.parent, warn=_say)
            except FileNotFoundError as none_complete:
                raise JobError(f"run {run_id}: checkpoint_location {location} is not readable here ({err}), "
                               f"nor is any other checkpoint of the run ({none_complete})") from err
            _say(f"run {run_id}: checkpoint_location {location} is incomplete; using {folder}")
            return ModelSource(spec=spec, path=folder / CHECKPOINT_FILE, run_id=run_id)
    raise JobError(f"run {run_id} has neither a `model_uri` nor a `checkpoint_location` tag: it logged no generator")


def remote_checkpoint_file(uri: str, download_dir: Path) -> Path:
    """Download what a remote `--model` names and return its generator file, as `local_checkpoint_file` would.

    A file is downloaded as it is; a checkpoint folder whole, then checked against its manifests; a run folder
    (any folder above checkpoint_* folders) one checkpoint folder at a time, in `latest_complete_checkpoint`'s
    order (those Ray's checkpoint manager snapshot lists first, then by name, newest first), until one is
    complete; newer incomplete ones are named on stderr. The mirror keeps the remote layout under download_dir.

    Raises:
        JobError: nothing at the URI, no credentials or endpoint, no complete checkpoint.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    from gan_core import manifest

    shown = _without_query(uri)
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return _download(filesystem, [info], root.rsplit("/", 1)[0], download_dir)[0]
        if info.type == pafs.FileType.NotFound:
            raise JobError(f"--model {shown}: nothing there (expected a checkpoint or run folder, or a .pt/.pth)")
        files = [item for item in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
                 if item.type == pafs.FileType.File]
    except (OSError, pa.ArrowException) as err:  # pyarrow's errors name the bucket and key, never the keys
        raise JobError(f"--model {shown}: cannot read it ({err}); the endpoint and keys come from "
                       "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from err
    by_folder: dict[str, list] = {}
    for item in files:
        by_folder.setdefault(item.path.rsplit("/", 1)[0], []).append(item)

    def holds_checkpoint(folder: str) -> bool:
        names = [item.base_name for item in by_folder.get(folder, [])]
        return any(name == CHECKPOINT_FILE or (name.startswith("manifest") and name.endswith(".json"))
                   or (name.startswith("sampler_rank") and name.endswith(".pt")) for name in names)

    root = root.rstrip("/")
    if holds_checkpoint(root):  # a checkpoint folder itself
        local = download_dir / root.rsplit("/", 1)[-1]
        _download(filesystem, by_folder[root], root, local)
        return local_checkpoint_file(local)
    folders = [folder for folder in by_folder
               if folder.rsplit("/", 1)[-1].startswith("checkpoint_") and holds_checkpoint(folder)]
    if not folders:
        raise JobError(f"--model {shown}: no checkpoint_* folder below it holds a {CHECKPOINT_FILE}")
    # Ray's snapshots first (small), to order the candidates as latest_complete_checkpoint does.
    snapshots = [item for item in files if item.base_name == manifest.RAY_SNAPSHOT_FILE]
    _download(filesystem, snapshots, root, download_dir)
    listed: dict[str, set[str]] = {}
    for parent in {folder.rsplit("/", 1)[0] for folder in folders}:
        local_parent = download_dir / parent[len(root):].lstrip("/")
        listed[parent] = manifest._ray_snapshot_names(local_parent, _say) or set()  # noqa: SLF001

    def order(folder: str) -> tuple:
        parent, name = folder.rsplit("/", 1)
        return (name in listed[parent], manifest._name_order(name))  # noqa: SLF001

    skipped: list[tuple[str, str]] = []
    for folder in sorted(folders, key=order, reverse=True):
        local = download_dir / folder[len(root):].lstrip("/")
        _download(filesystem, by_folder[folder], folder, local)
        problem = manifest.checkpoint_problem(local)
        if problem is None:
            for name, why in skipped:
                _say(f"skipping incomplete checkpoint {name} ({why}); using {shown.rstrip('/')}/{folder[len(root):].lstrip('/')}")
            return local / CHECKPOINT_FILE
        skipped.append((folder, problem))
    reasons = "; ".join(f"{folder.rsplit('/', 1)[-1]}: {problem}" for folder, problem in skipped)
    raise JobError(f"--model {shown}: no complete checkpoint ({reasons})")


def _download(filesystem, items: list, remote_root: str, local_root: Path) -> list[Path]:
    """Copy remote files (pyarrow FileInfo) below remote_root into local_root, keeping relative paths."""
    paths = []
    for item in items:
        target = local_root / item.path[len(remote_root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(item.path) as source, open(target, "wb") as sink:
            while chunk := source.read(8 << 20):
                sink.write(chunk)
        paths.append(target)
    return paths


def _without_query(uri: str) -> str:
    # s3://bucket/key?endpoint_override=...&access_key=... : a query can carry keys; never print it.
    return uri.split("?", 1)[0]


def _download_pyfunc_generator(uri: str, download_dir: Path) -> Path:
    """Download a pyfunc model logged by `jobs.tracking.pyfunc` and return its generator artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_dir)))
    except MlflowException as err:
        raise JobError(f"--model {uri}: cannot be downloaded from MLflow ({err.message})") from err
    except OSError as err:
        raise JobError(f"--model {uri}: cannot be downloaded from MLflow ({err})") from err
    return generator_artifact(local, uri)


def generator_artifact(model_dir: Path, uri: str) -> Path:
    """The generator file of a downloaded pyfunc model: the `generator` artifact its MLmodel names.

    The MLmodel comes from the tracking server, so its artifact path is not trusted: it must lead to a file
    inside `model_dir` once `..` and links are resolved (not `../../etc/passwd`, not an absolute path).

    Raises:
        JobError: no MLmodel, no `generator` artifact, a path leading outside `model_dir`, a missing file.
    """
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise JobError(f"--model {uri}: not an MLflow model (no MLmodel file in {model_dir})")
    try:
        description = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise JobError(f"--model {uri}: its MLmodel file is not valid YAML ({err})") from err
    relative = _lookup(description, "flavors", "python_function", "artifacts", "generator", "path")
    if not isinstance(relative, str) or not relative:
        raise JobError(f"--model {uri}: the model has no `generator` artifact; was it logged by this project (jobs.tracking.pyfunc)?")
    root = model_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise JobError(f"--model {uri}: its MLmodel names the generator artifact {relative!r}, which leads outside "
                       f"the downloaded model ({root}); refusing to read it")
    if not path.is_file():
        raise JobError(f"--model {uri}: artifact {relative} is missing from the downloaded model")
    return path


def _lookup(node: object, *keys: str) -> object:
    """node[k1][k2]... of parsed YAML, or None where a level is missing or not a mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model_run_id(uri: str) -> str | None:
    """The source run of a registered version (models:/name@alias or models:/name/N), when there is one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    body = uri[len("models:/") :]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id or None
        name, _, version = body.partition("/")
        if version.isdigit():
            return client.get_model_version(name, version).run_id or None
    except MlflowException:
        return None
    return None
