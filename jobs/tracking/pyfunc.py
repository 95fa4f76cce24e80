"""The generator as an MLflow pyfunc model: uint8 HxWx3 RGB image(s) in, enhanced uint8 image(s) out.

    model = mlflow.pyfunc.load_model("models:/esrgan-x4@champion")
    big = model.predict(small)                               # one HxWx3 uint8 array
    bigs = model.predict([img_a, img_b])                     # or a list of them (any sizes)
    big = model.predict(small, params={"tile": 128})         # smaller tiles, less memory

Large images are processed in overlapping tiles (`tile`, `tile_overlap`: the model config's
defaults, or `params` per call), so memory stays bounded. Loading needs this package installed
(gan_core and jobs) and nothing else; the generator file travels as the model's artifact.

The signature declares the params but no input schema on purpose: MLflow's tensor schemas fix
every dimension but the first (a 32x32 example would refuse any other size) and reject lists,
while this model takes any H, W and a list of differently sized images.

Logged as MLflow "models from code", not as a cloudpickled PythonModel: the model folder holds MLmodel,
a copy of this file (`pyfunc.py`) and the generator file (`artifacts/`), and no pickle, so loaders may
set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. Loading runs that copy (MLflow imports it under a
`code_model_<hex>` name; its last line hands MLflow the model): the code a loader executes is plain
Python anyone can read in the registry, pinned to the version that logged it. It is still code: who may
write to the registry must be restricted (cluster.yaml's MLflow server requires a login), and this
project's jobs never load a model through pyfunc: they read only the `generator` artifact with
`torch.load(weights_only=True)` (jobs.tracking.model_source).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec

GENERATOR_ARTIFACT = "generator"
MODEL_CODE = str(Path(__file__).resolve())  # what log_generator_model stores as the model's code
DEFAULT_TILE = 256
DEFAULT_TILE_OVERLAP = 16
# The package itself must be installed where the model is loaded; these are what it imports.
PIP_REQUIREMENTS = ["torch", "torchvision", "numpy", "pillow", "scipy", "pyarrow", "lpips", "pydantic", "pyyaml"]


class GeneratorModel(PythonModel):
    """pyfunc wrapper around `gan_core.checkpoint.load_generator` and tiled inference."""

    def load_context(self, context) -> None:
        import torch

        from gan_core.checkpoint import load_generator

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = load_generator(context.artifacts[GENERATOR_ARTIFACT], device=self.device)
        self.scale = int(getattr(self.generator, "scale", 4))
        config = context.model_config or {}
        self.tile = config.get("tile", DEFAULT_TILE)
        self.tile_overlap = config.get("tile_overlap", DEFAULT_TILE_OVERLAP)

    # model_input has no type hint on purpose: MLflow would try to build an input schema from it.
    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Enhance one uint8 HxWx3 RGB image, or each of a list of them.

        Args:
            model_input: an HxWx3 uint8 array, or a list / tuple of them.
            params: `tile` (LR tile side; 0 runs whole images) and `tile_overlap`.

        Returns:
            The enhanced uint8 image, or a list of them in input order.

        Raises:
            ValueError: an input is not a uint8 HxWx3 array.
        """
        from gan_core.inference import enhance_image

        params = params or {}
        tile = params.get("tile", self.tile)
        overlap = params.get("tile_overlap", self.tile_overlap)
        single = isinstance(model_input, np.ndarray) and model_input.ndim == 3
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            model_input = list(model_input)  # a stacked batch of same-size images
        if not single and not isinstance(model_input, (list, tuple)):
            raise ValueError(f"expected a uint8 HxWx3 array or a list of them, got {type(model_input).__name__}")
        images = [model_input] if single else list(model_input)
        outputs = [enhance_image(self.generator, _as_uint8(img), self.scale, self.device, tile=tile or None,
                                 tile_overlap=overlap) for img in images]
        return outputs[0] if single else outputs


def _as_uint8(img) -> np.ndarray:
    """Integer pixels in 0..255 as uint8: JSON (REST serving, MLflow's input-example check) turns uint8 into int64."""
    array = np.asarray(img)
    if array.dtype.kind in "iu" and array.dtype != np.uint8 and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    return array


def model_signature() -> ModelSignature:
    """The params the model takes per call (see the module docstring for why no input schema)."""
    return ModelSignature(params=ParamSchema([
        ParamSpec("tile", "long", DEFAULT_TILE),
        ParamSpec("tile_overlap", "long", DEFAULT_TILE_OVERLAP),
    ]))


def log_generator_model(generator_file: str | Path, name: str = "generator", registered_model_name: str | None = None):
    """Log a generator file (see `gan_core.checkpoint.save_generator` / `export_generator`) as a pyfunc model.

    Call inside an active MLflow run (or none: MLflow then logs a model without a run).

    Args:
        generator_file: a file that `gan_core.checkpoint.load_generator` reads (generator file or BasicSR .pth).
        name: the model's name within the run.
        registered_model_name: also register it as a new version of this registered model.

    Returns:
        mlflow's ModelInfo (its `model_uri` loads the model).

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a generator (checked before logging).
    """
    from gan_core.checkpoint import load_generator

    load_generator(generator_file)  # fail here, with load_generator's clear message, not at serving time
    example = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=MODEL_CODE,  # models from code: this file's source, no pickle (see the module docstring)
        artifacts={GENERATOR_ARTIFACT: str(generator_file)},
        signature=model_signature(),
        input_example=example,
        model_config={"tile": DEFAULT_TILE, "tile_overlap": DEFAULT_TILE_OVERLAP},
        # Explicit so MLflow does not spend minutes inferring them.
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
    )


# Models from code: MLflow runs the logged copy of this file under its own module name to build the model.
# Imported as a module of this package (the jobs log models with it), the file only defines the class.
if __name__ != "jobs.tracking.pyfunc":
    mlflow.models.set_model(GeneratorModel())
