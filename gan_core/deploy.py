"""Deployment formats of a generator: ONNX (dynamic H and W) and int8 post-training static quantization.

ONNX: the TorchScript-based exporter (`dynamo=False`). The torch.export-based one, torch's default
since 2.9, needs `onnxscript`, which our `export` extra does not install; the TorchScript path
exports RRDBNet (convs, concat, nearest upsampling, pixel_unshuffle) exactly and keeps H and W
symbolic.

int8: FX graph mode static quantization (`prepare_fx` / `convert_fx`). `quantize_dynamic` would
leave every Conv2d in float (it only handles Linear and RNN layers), and eager mode would need
RRDBNet rewritten with QuantStubs and FloatFunctional adds/cats; FX traces the unchanged model,
quantizes every conv (per-channel int8 weights, uint8 activations), the residual adds and
concats, and runs on fbgemm/x86 kernels on the CPU. Activation ranges are calibrated by running
real low-resolution images through the observed model. torch 2.14 marks `torch.ao.quantization`
deprecated (the successor is torchao's PT2E flow, not installed here); it still works, and its
deprecation warnings are silenced inside this module only.

Neither format needs Ray or MLflow.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gan_core.files import atomic_torch_save
from gan_core.models import build_generator, generator_config

INT8_FORMAT = "gan_core/int8-fx/1"
ONNX_INPUT, ONNX_OUTPUT = "lq", "sr"
QUANT_BACKENDS = ("x86", "fbgemm", "qnnpack")


def export_onnx(generator: nn.Module, out_file: str | Path, *, example_size: int = 32, opset: int = 17,
                half: bool = False) -> Path:
    """Write `generator` as ONNX with a dynamic batch, height and width.

    Args:
        generator: the model (left untouched: a CPU copy in eval mode is traced).
        out_file: the .onnx file to write (parent folders are created).
        example_size: side of the tracing input; any multiple of 4 works for every RRDBNet scale.
        opset: the ONNX opset.
        half: float16 weights, input and output (half the file; what fp16 runtimes such as TensorRT, DirectML
            and chaiNNer's ONNX backend run fastest). bfloat16 is not offered: onnxruntime has no bf16 Conv.

    Returns:
        The written path. The graph takes `lq` (N, C_in, H, W) float32 (float16 with `half`) in [0, 1] and
        returns `sr`.
    """
    dtype = torch.float16 if half else torch.float32
    model = copy.deepcopy(generator).cpu().eval().to(dtype)
    example = torch.rand(1, generator.arch["num_in_ch"], example_size, example_size, dtype=dtype)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            model, (example,), str(out_file), dynamo=False, opset_version=opset,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch", 2: "height", 3: "width"},
                          ONNX_OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}},
        )
    return out_file


def onnx_max_abs_diff(generator: nn.Module, onnx_file: str | Path, inputs: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch's float32 outputs over `inputs`.

    A float16 graph (`export_onnx(half=True)`) gets the inputs in float16; its difference then includes what
    float16 itself costs against the float32 model.

    Args:
        generator: the PyTorch model that was exported.
        onnx_file: the exported file.
        inputs: (N, 3, H, W) float tensors; use several sizes to check that H and W are really dynamic.

    Returns:
        max |onnx - torch| over all inputs and pixels.

    Raises:
        ImportError: onnxruntime is not installed (`pip install .[export]`).
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("onnxruntime is needed to check the ONNX export: pip install '.[export]'") from err
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    model = copy.deepcopy(generator).cpu().eval().float()
    half = session.get_inputs()[0].type == "tensor(float16)"
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model(x.cpu().float()).numpy()
            feed = (x.cpu().half() if half else x.cpu().float()).numpy()
            got = session.run([ONNX_OUTPUT], {ONNX_INPUT: feed})[0].astype("float32")
            if got.shape != expected.shape:
                raise ValueError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} "
                                 f"for input {tuple(x.shape)}")
            worst = max(worst, float(abs(got - expected).max()))
    return worst


def _use_backend(backend: str) -> None:
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; valid: {list(QUANT_BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantization backend {backend!r} is not available here; this torch has "
                         f"{torch.backends.quantized.supported_engines}")
    # The quantized kernels are chosen by this global engine; it must match the qconfig the model was built with.
    torch.backends.quantized.engine = backend


def _prepare(generator: nn.Module, backend: str, example: torch.Tensor,
             keep_float: tuple[str, ...]) -> torch.fx.GraphModule:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = get_default_qconfig_mapping(backend)
    for name in keep_float:
        mapping = mapping.set_module_name(name, None)
    if getattr(generator, "upsample_skip", "none") in ("bilinear", "bicubic"):
        # Quantized kernels exist for nearest upsampling only: the interpolations stay in float (the skip's
        # bilinear / bicubic upscale of the input, and with it the trunk's two nearest ones).
        mapping = mapping.set_object_type(torch.nn.functional.interpolate, None)
    return prepare_fx(copy.deepcopy(generator).cpu().eval(), mapping, (example,))


def _convert(observed: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    quantized = convert_fx(observed)
    # quantized::leaky_relu has no in-place variant: it warns on every call that inplace=True is ignored.
    for node in quantized.graph.nodes:
        if node.target is torch.ops.quantized.leaky_relu and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    quantized.recompile()
    return quantized


def quantize_int8(generator: nn.Module, calibration: Iterable[torch.Tensor], *, backend: str = "x86",
                  keep_float: tuple[str, ...] = ()) -> nn.Module:
    """Post-training static int8 quantization of an RRDBNet, calibrated on real inputs (CPU).

    Args:
        generator: the float model (left untouched; a copy is quantized).
        calibration: LR inputs, (N, 3, H, W) floats in [0, 1], e.g. the validation images degraded
            as in validation; their activation ranges set the quantization scales.
        backend: "x86" (default, fbgemm with AVX-512 VNNI when present), "fbgemm" or "qnnpack" (ARM).
        keep_float: module names left in float, e.g. ("conv_first", "conv_last"): activations are
            quantized per tensor, so a network that carries the image itself through a few feature
            channels (next to channels of a much larger range) loses precision there first.

    Returns:
        The quantized model (a torch.fx.GraphModule), float in and float out, CPU only.

    Raises:
        ValueError: no calibration input, an unknown / unavailable backend, or a keep_float name
            that is not a module of `generator`.
    """
    _use_backend(backend)
    unknown = sorted(set(keep_float) - {name for name, _ in generator.named_modules()})
    if unknown:
        raise ValueError(f"keep_float names no module of the generator: {unknown}")
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ValueError("int8 calibration needs at least one input image")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        observed = _prepare(generator, backend, first.cpu(), tuple(keep_float))
        observed(first.cpu())
        for x in batches:
            observed(x.cpu())
        return _convert(observed)


def save_int8(model: nn.Module, float_generator: nn.Module, out_file: str | Path, backend: str = "x86",
              keep_float: tuple[str, ...] = ()) -> Path:
    """Write a quantized model as its state dict plus the recipe that rebuilds its graph.

    The file is read with `torch.load(weights_only=True)`: it holds tensors and plain data only.

    Args:
        model: the output of `quantize_int8`.
        float_generator: the float model it came from; its full config (`generator_config`) is stored,
            so every option (res_scale, upsample_skip, ...) is rebuilt.
        out_file: the file to write.
        backend, keep_float: what it was quantized with.

    Returns:
        The written path.
    """
    payload = {"format": INT8_FORMAT, "generator": generator_config(float_generator), "backend": backend,
               "keep_float": list(keep_float), "state_dict": model.state_dict()}
    return atomic_torch_save(payload, out_file)


def load_int8(path: str | Path) -> nn.Module:
    """Rebuild a model written by `save_int8` (CPU, eval mode).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not an int8 export of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no int8 model at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != INT8_FORMAT:
        raise ValueError(f"{path} is not a {INT8_FORMAT} file")
    backend = payload["backend"]
    _use_backend(backend)
    # The graph (and so the state dict's keys) is a function of the architecture alone; the
    # observers' ranges come from the saved scales, so no calibration data is needed here.
    example = torch.zeros(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        model = _convert(_prepare(build_generator(**payload["generator"]), backend, example, tuple(payload.get("keep_float", ()))))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def serialized_size(module: nn.Module) -> int:
    """Bytes of `torch.save(module.state_dict())`: what the weights cost on disk."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()
