"""BasicSR / Real-ESRGAN `.pth` files: which state dict to take, and the RRDBNet that fits it.

`gan_core.checkpoint.load_generator` reads these files next to our own; nothing here loads a file.
"""

import torch

# conv_first's input channels / output channels -> scale (BasicSR unshuffles
# scale 2 by 2 and scale 1 by 4 before conv_first).
_SCALE_BY_CHANNEL_RATIO = {1: 4, 4: 2, 16: 1}
# Wrappers that prefix parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the DDP / torch.compile prefixes (which nest: "_orig_mod.module.conv_first.weight")."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def is_state_dict(obj: object) -> bool:
    """A non-empty dict whose values are all tensors."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_state_dict(obj: object, use_ema: bool) -> dict[str, torch.Tensor] | None:
    """The RRDBNet weights in a loaded BasicSR file (`params_ema`, `params`, or a plain state dict), or None.

    A file with only one of `params_ema` / `params` gives that one whatever `use_ema` says: Real-ESRGAN's
    releases ship `params_ema` alone.
    """
    if not isinstance(obj, dict):
        return None
    for key in ("params_ema", "params") if use_ema else ("params", "params_ema"):
        if is_state_dict(obj.get(key)):
            return strip_wrapper_prefixes(obj[key])
    if is_state_dict(obj):
        state_dict = strip_wrapper_prefixes(obj)
        if "conv_first.weight" in state_dict:
            return state_dict
    return None


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
