"""The generator as a self-contained MLflow pyfunc model: images in, enhanced images out.

Two ways in, one model:

    # REST (`mlflow models serve`) and DataFrames: an `image` column of encoded PNG / JPEG bytes
    # (base64 strings in JSON), any sizes in one request; out: an `image` column of PNG bytes.
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \
        -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"], ["<base64 JPEG>"]]}}'

    model = mlflow.pyfunc.load_model("models:/esrgan-x4@champion")
    out = model.predict(pd.DataFrame({"image": [png_bytes, jpeg_bytes]}))["image"]   # the REST path, in-process
    out = model.predict(frame, params={"tile": 128})         # smaller tiles, less memory

    # Python: uint8 HxWx3 RGB arrays in and out, no encoding (MLflow's schema check wants DataFrames, so
    # arrays go to the model itself).
    generator = model.unwrap_python_model()
    big = generator.enhance(small)                           # one HxWx3 uint8 array
    bigs = generator.enhance([img_a, img_b], tile=128)       # or a list of them (any sizes)

Every task (the generator file's, gan_core.checkpoint.generator_task; the logged model's `task` tag and
metadata say which): sr, denoise and lowlight RGB models take and give RGB images; gray denoise and
lowlight models take the image's luma and answer gray PNGs (H x W arrays). A fusion model takes pairs:
the visible image in `image` and the infrared one in `ir` (an optional binary column of the signature;
same size, gray: an RGB-stored gray file is fine, a false-colour one is refused), and answers the fused
image, in the visible image's colour when that has colour (gan_core.inference.recolour), gray when it is
gray or with the param `gray`:

    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \
        -d '{"dataframe_split": {"columns": ["image", "ir"], "data": [["<base64 visible>", "<base64 infrared>"]]}}'
    fused = model.predict(pd.DataFrame({"image": [visible_png], "ir": [ir_png]}), params={"gray": True})
    fused = generator.enhance(visible, ir=infrared)          # arrays: one pair, or lists of the same length

A fusion request without `ir`, and an `ir` column sent to a model that is not a fusion one, are refused
(HTTP 400) with one line that names the column.

Large images are processed in overlapping tiles (`tile`, `tile_overlap`: the model config's defaults, or
`params` per call), so memory stays bounded; `max_pixels` refuses larger inputs. A malformed request (no
`image` column, bytes that are not an image, an image over the limit) is refused with one line that says
which row and why (HTTP 400 from the scoring server, which prefixes it with "Failed to predict data").

Self-contained: the model carries `gan_core` as code (`code_paths`), and its requirements are the
third-party packages gan_core imports, so it loads and serves where this repository is not checked out
and not installed (`mlflow models serve --env-manager virtualenv`, or `local` in any environment with
those packages). We ship code, not a wheel of the project: gan_core is pure Python, the model then holds
exactly the code that trained it, and no index has to host our package. The `jobs` package is not needed.

The signature declares the `image` column as binary in and out: MLflow base64-decodes it from JSON (and
base64-encodes the PNG bytes of the answer), and the schema is visible in the registry.

Logged as MLflow "models from code", not as a cloudpickled PythonModel: the model folder holds MLmodel,
a copy of this file, the gan_core code and the generator files (`artifacts/`), and no pickle, so loaders
may set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. Loading runs that code: who may write to the registry
must be restricted (cluster.yaml's MLflow server requires a login), and this project's jobs never load a
model through pyfunc: they read only the `generator` artifact with `torch.load(weights_only=True)`
(jobs.tracking.model_source).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

GENERATOR_ARTIFACT = "generator"
SAFETENSORS_ARTIFACT = "safetensors"  # gan_core.portable: for chaiNNer / ComfyUI / spandrel
BASICSR_PTH_ARTIFACT = "basicsr_pth"  # only when the generator is exactly BasicSR's RRDBNet
IMAGE_COLUMN = "image"
IR_COLUMN = "ir"  # fusion models: the infrared image of each row
MODEL_CODE = str(Path(__file__).resolve())  # what log_generator_model stores as the model's code
GAN_CORE_DIR = str(Path(__file__).resolve().parents[2] / "gan_core")  # shipped with the model (code_paths)
DEFAULT_TILE = 256
DEFAULT_TILE_OVERLAP = 16
DEFAULT_MAX_PIXELS = 16_000_000  # per input image (4000 x 4000); larger ones are refused, not run out of memory
# What gan_core imports (checked by the no-checkout test); the model brings gan_core itself.
PIP_REQUIREMENTS = ["torch", "torchvision", "numpy", "pillow", "scipy", "pyarrow", "lpips", "pydantic", "pyyaml",
                    "safetensors", "tqdm", "pandas"]


class GeneratorModel(PythonModel):
    """pyfunc wrapper around `gan_core.checkpoint.load_generator` and tiled inference."""

    def load_context(self, context) -> None:
        import torch

        from gan_core.checkpoint import generator_task, load_generator
        from gan_core.inference import GPU_TILE_BATCH, generator_channels

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = load_generator(context.artifacts[GENERATOR_ARTIFACT], device=self.device)
        if self.device.type == "cuda":  # convolutions in channels_last run faster on tensor cores
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.scale = int(getattr(self.generator, "scale", 4))
        self.task = generator_task(context.artifacts[GENERATOR_ARTIFACT]).name
        # What the model does follows from its channels: (2, 1) takes (infrared, visible) pairs.
        self.channels = generator_channels(self.generator)
        self.fusion = self.channels == (2, 1)
        config = context.model_config or {}
        self.tile = config.get("tile", DEFAULT_TILE)
        self.tile_overlap = config.get("tile_overlap", DEFAULT_TILE_OVERLAP)
        self.max_pixels = config.get("max_pixels", DEFAULT_MAX_PIXELS)
        self.tile_batch = config.get("tile_batch") or (GPU_TILE_BATCH if self.device.type == "cuda" else 1)

    # model_input has no type hint on purpose: MLflow would try to build an input schema from it.
    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Enhance the encoded images of a DataFrame's `image` column (uint8 arrays: see `enhance`).

        Args:
            model_input: a pandas DataFrame with an `image` column (PNG / JPEG / ... bytes, any sizes); or,
                called on the unwrapped model, what `enhance` takes.
            params: `tile` (LR tile side; 0 runs whole images), `tile_overlap`, `tile_batch` (tiles per forward
                pass; 0: the model's default, 8 on a GPU, 1 on the CPU), `bf16` (bfloat16 autocast: about twice the
                speed on recent GPUs, outputs within a few levels of 255), and for fusion models `gray` (the fused
                luma even when the visible image has colour).

        Returns:
            A DataFrame with an `image` column of PNG bytes (RGB, or gray for gray results), rows in input order.

        Raises:
            MlflowException (INVALID_PARAMETER_VALUE, HTTP 400): a malformed input; one line says why.
        """
        import pandas as pd

        params = params or {}
        if not isinstance(model_input, pd.DataFrame):
            return self.enhance(model_input, **params)
        settings = self._settings(params.get("tile"), params.get("tile_overlap"), params.get("tile_batch"),
                                  bool(params.get("bf16", False)), bool(params.get("gray", False)))
        return pd.DataFrame({IMAGE_COLUMN: self._enhance_encoded(model_input, settings)})

    def enhance(self, images, ir=None, tile: int | None = None, tile_overlap: int | None = None, gray: bool = False,
                tile_batch: int | None = None, bf16: bool = False):
        """Enhance one uint8 HxWx3 RGB array, a stacked NxHxWx3 array, or a list of arrays (any sizes).

        Args:
            images: the images (for fusion models the visible ones).
            ir: fusion models only, and for them required: the infrared image(s), one per image, same sizes.
            tile, tile_overlap, tile_batch, bf16: as the params (None: the model config's).
            gray: fusion models: the fused luma even when the visible image has colour.

        Returns:
            The enhanced uint8 array (HxWx3, or HxW for gray results), or a list of them in input order.

        Raises:
            MlflowException (INVALID_PARAMETER_VALUE): not uint8 images, over the pixel limit, `ir` missing for
                a fusion model or given to another, infrared and visible images that do not pair.
        """
        settings = self._settings(tile, tile_overlap, tile_batch, bf16, gray)
        batch, single = _as_batch(images, "images")
        self._check_ir_given(ir is not None)
        irs = [None] * len(batch)
        if ir is not None:
            irs, ir_single = _as_batch(ir, "ir")
            if ir_single != single or len(irs) != len(batch):
                raise _bad_input(f"ir: expected one infrared image per image ({len(batch)}), got {len(irs)}")
        outputs = [self._enhance(_as_uint8(img), None if infrared is None else _as_uint8(infrared),
                                 f"image {index}", settings)
                   for index, (img, infrared) in enumerate(zip(batch, irs))]
        return outputs[0] if single else outputs

    def _settings(self, tile: int | None, tile_overlap: int | None, tile_batch: int | None, bf16: bool,
                  gray: bool) -> dict[str, Any]:
        """gan_core.inference.enhance's keyword arguments for one call; None (and tile_batch 0) take the model's."""
        return {"tile": (self.tile if tile is None else tile) or None,
                "tile_overlap": self.tile_overlap if tile_overlap is None else tile_overlap,
                "tile_batch": tile_batch or self.tile_batch, "bf16": bf16, "colour": self._colour(gray)}

    def _colour(self, gray: bool) -> bool | None:
        """gan_core.inference.enhance's `colour` for the `gray` param: None (colour when the visible image has it)."""
        if gray and not self.fusion:
            raise _bad_input(f"param gray is for fusion models; this model is {self._described()}")
        return False if gray else None

    def _described(self) -> str:
        return f"{self.task} ({self.channels[0]} -> {self.channels[1]} channels)"

    def _check_ir_given(self, given: bool) -> None:
        if self.fusion and not given:
            raise _bad_input(f"this model is {self._described()}: send the infrared image of each row in an "
                             f"{IR_COLUMN!r} column next to the visible one in {IMAGE_COLUMN!r}")
        if given and not self.fusion:
            raise _bad_input(f"column {IR_COLUMN!r} is for fusion models; this model is {self._described()}: "
                             f"send only {IMAGE_COLUMN!r}")

    def _enhance_encoded(self, frame, settings: dict[str, Any]) -> list[bytes]:
        if IMAGE_COLUMN not in frame.columns:
            raise _bad_input(f"no {IMAGE_COLUMN!r} column (got {list(map(str, frame.columns))}); send "
                             f"{{\"dataframe_split\": {{\"columns\": [\"{IMAGE_COLUMN}\"], \"data\": [[<base64>]]}}}}")
        # MLflow's schema check may add the optional column, empty, to a request without it.
        has_ir = IR_COLUMN in frame.columns and not frame[IR_COLUMN].isna().all()
        self._check_ir_given(has_ir)
        irs = frame[IR_COLUMN] if has_ir else [None] * len(frame)
        outputs = []
        for index, (data, ir_data) in enumerate(zip(frame[IMAGE_COLUMN], irs)):
            img = self._decode(data, index, IMAGE_COLUMN)
            ir = self._decode(ir_data, index, IR_COLUMN) if has_ir else None
            outputs.append(_encode_png(self._enhance(img, ir, f"row {index}", settings)))
        return outputs

    def _decode(self, data, index: int, column: str) -> np.ndarray:
        from gan_core.data import ImageDecodeError, decode_image

        label = f"row {index}" if column == IMAGE_COLUMN else f"row {index} {column}"
        if isinstance(data, str):  # a column MLflow did not decode (no schema): base64 text
            data = _b64decode(data, index)
        if not isinstance(data, (bytes, bytearray)):
            raise _bad_input(f"{label}: expected encoded image bytes, got {type(data).__name__}")
        try:
            return decode_image(bytes(data), name=label, max_pixels=self.max_pixels)
        except (ImageDecodeError, ValueError) as err:  # ImageTooLargeError is a ValueError
            raise _bad_input(_one_line(err)) from None

    def _enhance(self, img: np.ndarray, ir: np.ndarray | None, name: str, settings: dict[str, Any]) -> np.ndarray:
        from gan_core.inference import enhance

        try:
            return enhance(self.generator, img, self.scale, self.device, ir=ir, max_pixels=self.max_pixels,
                           **settings)
        except ValueError as err:  # not uint8 images, over max_pixels, bad tile settings, IR and visible unpaired
            raise _bad_input(f"{name}: {_one_line(err)}") from None


def _bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _b64decode(text: str, index: int) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {index}: not base64-encoded image bytes") from None


def _as_batch(images, what: str) -> tuple[list, bool]:
    """(list of images, whether one image was given): one HxW(x3) array, a stacked NxHxWx3 array, or a list."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False  # a stacked batch of same-size images
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images], True
    if isinstance(images, (list, tuple)):
        return list(images), False
    raise _bad_input(f"{what}: expected a uint8 HxWx3 array or a list of them, got {type(images).__name__}")


def _encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB (HxWx3) or gray (HxW) result."""
    import io

    from PIL import Image

    from gan_core.data import encode_png

    if img.ndim == 3:
        return encode_png(img)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buffer, format="PNG", compress_level=3)  # encode_png's level
    return buffer.getvalue()


def _as_uint8(img) -> np.ndarray:
    """Integer pixels in 0..255 as uint8: JSON (MLflow's input-example check) turns uint8 into int64."""
    array = np.asarray(img)
    if array.dtype.kind in "iu" and array.dtype != np.uint8 and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    return array


def model_signature() -> ModelSignature:
    """An `image` column of bytes in and out (and an optional `ir` column in, for fusion models), and the
    per-call params."""
    inputs = Schema([ColSpec("binary", IMAGE_COLUMN), ColSpec("binary", IR_COLUMN, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), params=ParamSchema([
        ParamSpec("tile", "long", DEFAULT_TILE),
        ParamSpec("tile_overlap", "long", DEFAULT_TILE_OVERLAP),
        ParamSpec("tile_batch", "long", 0),
        ParamSpec("bf16", "boolean", False),
        ParamSpec("gray", "boolean", False),
    ]))


def log_generator_model(generator_file: str | Path, name: str = "generator", registered_model_name: str | None = None):
    """Log a generator file (see `gan_core.checkpoint.save_generator` / `export_generator`) as a pyfunc model,
    with its safetensors (and, for BasicSR-exact generators, BasicSR `.pth`) exports as artifacts.

    The file's task (`gan_core.checkpoint.generator_task`) goes into the model's metadata (MLmodel) and tags,
    with the channels, so the registry says what the model does: tag `task` (sr | denoise | lowlight | fusion),
    `task.gray`, `channels` ("2->1").

    Call inside an active MLflow run (or none: MLflow then logs a model without a run).

    Args:
        generator_file: a file that `gan_core.checkpoint.load_generator` reads without `arch` (one of ours).
        name: the model's name within the run (training names it after the run).
        registered_model_name: also register it as a new version of this registered model.

    Returns:
        mlflow's ModelInfo (its `model_uri` loads the model).

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a generator (checked before logging).
    """
    import io

    import pandas as pd
    from PIL import Image

    from gan_core.checkpoint import generator_task, load_generator
    from gan_core.inference import generator_channels
    from gan_core.models import generator_config
    from gan_core.portable import write_portable

    generator = load_generator(generator_file)  # fail here, with load_generator's clear message, not at serving
    task = generator_task(generator_file)
    channels = generator_channels(generator)
    description = {"task": task.name, "task.gray": str(task.gray).lower(), "channels": f"{channels[0]}->{channels[1]}"}
    rng = np.random.default_rng(0)
    example = io.BytesIO()
    Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(example, "PNG")
    example_frame = pd.DataFrame({IMAGE_COLUMN: [example.getvalue()]})
    if channels == (2, 1):  # fusion: a gray infrared image of the same size
        ir_example = io.BytesIO()
        Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8)).save(ir_example, "PNG")
        example_frame[IR_COLUMN] = [ir_example.getvalue()]
    with tempfile.TemporaryDirectory(prefix="portable-") as tmp:
        files = write_portable(tmp, generator_config(generator), generator.state_dict(), step=_step(generator_file))
        artifacts = {GENERATOR_ARTIFACT: str(generator_file), SAFETENSORS_ARTIFACT: str(files.safetensors)}
        if files.pth is not None:
            artifacts[BASICSR_PTH_ARTIFACT] = str(files.pth)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=MODEL_CODE,  # models from code: this file's source, no pickle (see the module docstring)
            code_paths=[GAN_CORE_DIR],
            artifacts=artifacts,
            signature=model_signature(),
            input_example=example_frame,
            model_config={"tile": DEFAULT_TILE, "tile_overlap": DEFAULT_TILE_OVERLAP, "max_pixels": DEFAULT_MAX_PIXELS},
            metadata=description,
            tags=description,
            # Explicit so MLflow does not spend minutes inferring them.
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_model_name,
        )


def _step(generator_file: str | Path) -> int:
    from gan_core.checkpoint import read_checkpoint

    try:
        return int(read_checkpoint(generator_file).get("step", 0))
    except Exception:  # noqa: BLE001 - not one of our files: no step recorded
        return 0


# Models from code: MLflow runs the logged copy of this file under its own module name to build the model.
# Imported as a module of this package (the jobs log models with it), the file only defines the class.
if __name__ != "jobs.tracking.pyfunc":
    mlflow.models.set_model(GeneratorModel())
