"""Discriminators: BasicSR's VGG-style one (any size >= 32 px) and Real-ESRGAN's U-Net.

Both return logits (no sigmoid); the adversarial losses apply their own link.
Both are safe under DDP and torch.compile: activations are not in-place, and
nothing is stored on `self` during forward (spectral norm's power-iteration
vectors are buffers that torch itself updates, as in every SN-GAN).
"""

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

_NORMS = ("batch", "none")

# (conv name suffix, in-channel multiple, out-channel multiple, kernel, stride) of
# BasicSR's 128 px layout after conv0_0; each stride-2 conv halves H and W.
_VGG_LAYERS = (
    ("0_1", 1, 1, 4, 2),
    ("1_0", 1, 2, 3, 1),
    ("1_1", 2, 2, 4, 2),
    ("2_0", 2, 4, 3, 1),
    ("2_1", 4, 4, 4, 2),
    ("3_0", 4, 8, 3, 1),
    ("3_1", 8, 8, 4, 2),
    ("4_0", 8, 8, 3, 1),
    ("4_1", 8, 8, 4, 2),
)
_VGG_MIN_SIZE = 32  # five stride-2 convs: 32 px -> 1 px


def _maybe_sn(module: nn.Module, use_sn: bool) -> nn.Module:
    return _spectral_norm(module) if use_sn else module


class VGGStyleDiscriminator(nn.Module):
    """BasicSR's VGG-style discriminator with an adaptive pool, so any input >= 32 px works.

    The pool to 4x4 before the linear layers is the identity at 128 px, where the
    state_dict keys and shapes equal BasicSR's (`conv0_0 ... conv4_1`, `bn0_1 ...`,
    `linear1`, `linear2`) and its weights load unchanged.

    Args:
        num_in_ch: Image channels in.
        num_feat: Channels of the first conv (deeper ones use 2x, 4x, 8x).
        norm: "batch" (BasicSR) or "none". Without a norm the convs get a bias.
        spectral_norm: Wrap every conv and linear in spectral norm; needs norm="none".

    Raises:
        ValueError: On an unknown norm, or spectral_norm=True with norm="batch".
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, norm: str = "batch", spectral_norm: bool = False):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {list(_NORMS)}, got {norm!r}")
        if spectral_norm and norm != "none":
            raise ValueError("spectral_norm=True needs norm='none' (batch norm undoes the Lipschitz bound)")
        use_bn = norm == "batch"
        self.conv0_0 = _maybe_sn(nn.Conv2d(num_in_ch, num_feat, 3, 1, 1, bias=True), spectral_norm)
        for suffix, in_mult, out_mult, kernel, stride in _VGG_LAYERS:
            conv = nn.Conv2d(num_feat * in_mult, num_feat * out_mult, kernel, stride, 1, bias=not use_bn)
            setattr(self, f"conv{suffix}", _maybe_sn(conv, spectral_norm))
            # Identity keeps forward uniform and adds no state_dict keys.
            setattr(self, f"bn{suffix}", nn.BatchNorm2d(num_feat * out_mult) if use_bn else nn.Identity())
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.linear1 = _maybe_sn(nn.Linear(num_feat * 8 * 4 * 4, 100), spectral_norm)
        self.linear2 = _maybe_sn(nn.Linear(100, 1), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W) with H, W >= 32 -> (N, 1) logits
        if x.shape[-2] < _VGG_MIN_SIZE or x.shape[-1] < _VGG_MIN_SIZE:
            raise ValueError(f"VGGStyleDiscriminator needs H and W >= {_VGG_MIN_SIZE}, got {tuple(x.shape)}")
        feat = F.leaky_relu(self.conv0_0(x), 0.2)
        for suffix, *_ in _VGG_LAYERS:
            feat = F.leaky_relu(getattr(self, f"bn{suffix}")(getattr(self, f"conv{suffix}")(feat)), 0.2)
        feat = self.pool(feat)  # (N, 8 * num_feat, 4, 4); identity at 128 px
        # flatten, not view: a channels_last tensor is not viewable as (N, -1).
        feat = F.leaky_relu(self.linear1(torch.flatten(feat, 1)), 0.2)
        return self.linear2(feat)


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral norm: one logit per pixel.

    Layout and forward as BasicSR 1.4.2 / Real-ESRGAN. Spectral norm uses
    `torch.nn.utils.parametrizations`, so a checkpoint made with the older
    `torch.nn.utils.spectral_norm` (Real-ESRGAN's released net_d files) loads
    after `convert_legacy_spectral_norm_keys`.

    Args:
        num_in_ch: Image channels in.
        num_feat: Channels of the first conv (deeper ones use 2x, 4x, 8x).
        skip_connection: Add encoder features to the decoder (U-Net skips).
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True):
        super().__init__()
        self.skip_connection = skip_connection
        sn = _spectral_norm
        self.conv0 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        # encoder: each conv halves H and W
        self.conv1 = sn(nn.Conv2d(num_feat, num_feat * 2, 4, 2, 1, bias=False))
        self.conv2 = sn(nn.Conv2d(num_feat * 2, num_feat * 4, 4, 2, 1, bias=False))
        self.conv3 = sn(nn.Conv2d(num_feat * 4, num_feat * 8, 4, 2, 1, bias=False))
        # decoder: bilinear x2 then conv
        self.conv4 = sn(nn.Conv2d(num_feat * 8, num_feat * 4, 3, 1, 1, bias=False))
        self.conv5 = sn(nn.Conv2d(num_feat * 4, num_feat * 2, 3, 1, 1, bias=False))
        self.conv6 = sn(nn.Conv2d(num_feat * 2, num_feat, 3, 1, 1, bias=False))
        self.conv7 = sn(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv8 = sn(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(num_feat, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W), H and W divisible by 8 -> (N, 1, H, W) logits
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"UNetDiscriminatorSN needs H and W divisible by 8, got {tuple(x.shape)}")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)  # /2
        x2 = F.leaky_relu(self.conv2(x1), 0.2)  # /4
        x3 = F.leaky_relu(self.conv3(x2), 0.2)  # /8

        x3 = F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
        x4 = F.leaky_relu(self.conv4(x3), 0.2)  # /4
        if self.skip_connection:
            x4 = x4 + x2
        x4 = F.interpolate(x4, scale_factor=2, mode="bilinear", align_corners=False)
        x5 = F.leaky_relu(self.conv5(x4), 0.2)  # /2
        if self.skip_connection:
            x5 = x5 + x1
        x5 = F.interpolate(x5, scale_factor=2, mode="bilinear", align_corners=False)
        x6 = F.leaky_relu(self.conv6(x5), 0.2)  # /1
        if self.skip_connection:
            x6 = x6 + x0

        out = F.leaky_relu(self.conv7(x6), 0.2)
        out = F.leaky_relu(self.conv8(out), 0.2)
        return self.conv9(out)


# Old `torch.nn.utils.spectral_norm` key suffix -> parametrizations key suffix.
_LEGACY_SN_SUFFIXES = {
    ".weight_orig": ".parametrizations.weight.original",
    ".weight_u": ".parametrizations.weight.0._u",
    ".weight_v": ".parametrizations.weight.0._v",
}


def convert_legacy_spectral_norm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys saved with the old hook-based spectral norm to the parametrization names.

    The power-iteration vectors mean the same in both, so the converted weights give
    the same outputs (checked against BasicSR's UNetDiscriminatorSN).

    Args:
        state_dict: A discriminator state dict, e.g. Real-ESRGAN's `params` of net_d.

    Returns:
        A new dict; keys without a legacy suffix are kept as they are.
    """
    converted = {}
    for key, value in state_dict.items():
        for old, new in _LEGACY_SN_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        converted[key] = value
    return converted
