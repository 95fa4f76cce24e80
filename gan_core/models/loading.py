"""Load a generator for inference from our checkpoints or from BasicSR / Real-ESRGAN `.pth` files."""

import pickle
from pathlib import Path

import torch
from torch import nn

from gan_core.models import build_generator
from gan_core.models.rrdb import RRDBNet

CHECKPOINT_FORMAT = "gan_core/1"
CHECKPOINT_FILENAME = "checkpoint.pt"

# conv_first's input channels / output channels -> scale (BasicSR unshuffles
# scale 2 by 2 and scale 1 by 4 before conv_first).
_SCALE_BY_CHANNEL_RATIO = {1: 4, 4: 2, 16: 1}
# Wrappers that prefix parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _describe(obj: object) -> str:
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:12]]
        more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
        return f"a dict with top-level keys [{', '.join(keys)}{more}]"
    return f"an object of type {type(obj).__name__}"


_EXPECTED = (
    f"expected a {CHECKPOINT_FORMAT!r} checkpoint (a dict with 'format', 'config', 'generator', "
    "'generator_ema') or a BasicSR RRDBNet state dict (plain, or under 'params_ema' / 'params')"
)


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        # Wrappers nest (a compiled DDP model saves "_orig_mod.module."), so strip until none is left.
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _resolve_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no generator checkpoint at {path}")
    return path


def _load_file(path: Path, device: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary pickled objects; keep torch's one-line reason, not its advice
        # to retry with weights_only=False (which would run the file's code).
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line), str(err))
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers ({reason}); {_EXPECTED}"
        ) from err
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - arbitrary bytes fail in many ways (KeyError, EOFError, RuntimeError ...)
        raise ValueError(f"{path} is not a torch.save file ({type(err).__name__}: {err}); {_EXPECTED}") from err


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        # Missing/unexpected keys or wrong shapes: the file does not match the model it describes.
        raise ValueError(f"{path}: weights do not match {type(model).__name__}: {err}") from err


def _from_our_checkpoint(ckpt: dict, path: Path, use_ema: bool) -> nn.Module:
    config = ckpt.get("config")
    generator_config = config.get("generator") if isinstance(config, dict) else None
    if not isinstance(generator_config, dict):
        raise ValueError(f"{path}: {CHECKPOINT_FORMAT} checkpoint has no config['generator']; found {_describe(ckpt)}")
    state_dict = ckpt.get("generator_ema") if use_ema else None
    if state_dict is None:
        state_dict = ckpt.get("generator")
    if not _is_state_dict(state_dict):
        raise ValueError(f"{path}: {CHECKPOINT_FORMAT} checkpoint has no 'generator' weights; found {_describe(ckpt)}")
    model = build_generator(**generator_config)
    _load_strict(model, _strip_wrapper_prefixes(state_dict), path)
    return model


def _pick_basicsr_state_dict(obj: object, path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    order = ("params_ema", "params") if use_ema else ("params", "params_ema")
    if isinstance(obj, dict):
        # A file with only one of the two is loaded whatever use_ema says:
        # Real-ESRGAN's releases ship params_ema alone.
        for key in order:
            if _is_state_dict(obj.get(key)):
                return _strip_wrapper_prefixes(obj[key])
        if _is_state_dict(obj):
            state_dict = _strip_wrapper_prefixes(obj)
            if "conv_first.weight" in state_dict:
                return state_dict
    raise ValueError(f"{path}: found {_describe(obj)}; {_EXPECTED}")


def rrdb_kwargs_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """Infer RRDBNet's constructor arguments from a BasicSR-format state dict.

    Args:
        state_dict: RRDBNet weights with unprefixed keys (conv_first.weight, body.0.rdb1.conv1.weight, ...).

    Returns:
        Keyword arguments for RRDBNet: num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch.
        res_scale is not stored in BasicSR files and is left at its default (0.2, BasicSR's constant).

    Raises:
        ValueError: If a needed key is missing or the channel counts fit no supported scale.
    """
    for key in ("conv_first.weight", "conv_last.weight"):
        if key not in state_dict:
            raise ValueError(f"not an RRDBNet state dict: no {key!r}; keys start with {list(state_dict)[:5]}")
    num_feat, first_in_ch = state_dict["conv_first.weight"].shape[:2]
    num_out_ch = state_dict["conv_last.weight"].shape[0]
    # The image has as many channels in as out in every BasicSR/Real-ESRGAN release;
    # that is what disambiguates 12 channels (3 at scale 2, not 12 at scale 4).
    ratio, remainder = divmod(int(first_in_ch), int(num_out_ch))
    if remainder or ratio not in _SCALE_BY_CHANNEL_RATIO:
        raise ValueError(
            f"conv_first has {first_in_ch} input channels for {num_out_ch} output channels; "
            f"expected {[r * num_out_ch for r in sorted(_SCALE_BY_CHANNEL_RATIO)]} (scale 4, 2, 1)"
        )
    block_ids = {int(key.split(".")[1]) for key in state_dict if key.startswith("body.")}
    grow_key = "body.0.rdb1.conv1.weight"
    return {
        "num_in_ch": int(num_out_ch),
        "num_out_ch": int(num_out_ch),
        "scale": _SCALE_BY_CHANNEL_RATIO[ratio],
        "num_feat": int(num_feat),
        "num_block": len(block_ids),
        "num_grow_ch": int(state_dict[grow_key].shape[0]) if grow_key in state_dict else 32,
    }


def load_generator(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> nn.Module:
    """Load a generator in eval mode from our checkpoint or a BasicSR / Real-ESRGAN `.pth`.

    Args:
        path: A `checkpoint.pt` (format "gan_core/1"), a directory holding one, or a
            BasicSR-format `.pth` (RRDBNet weights, plain or under "params_ema" / "params";
            a "module." or "_orig_mod." prefix is stripped).
        device: Where to put the weights (passed to torch.load as map_location).
        use_ema: Prefer the EMA weights ("generator_ema" / "params_ema") when the file has them.

    Returns:
        The generator on `device`, in eval mode, with its weights loaded strictly.

    Raises:
        FileNotFoundError: If the path (or `<dir>/checkpoint.pt`) does not exist.
        ValueError: If the file is neither format; the message shows what it found and what was expected.
    """
    path = _resolve_path(path)
    obj = _load_file(path, device)
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {obj['format']!r} is not supported; {_EXPECTED}")
        model = _from_our_checkpoint(obj, path, use_ema)
    else:
        state_dict = _pick_basicsr_state_dict(obj, path, use_ema)
        try:
            kwargs = rrdb_kwargs_from_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        model = RRDBNet(**kwargs)
        _load_strict(model, state_dict, path)
    return model.to(device).eval()
