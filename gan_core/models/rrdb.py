"""RRDBNet, the ESRGAN / Real-ESRGAN generator, with the residual scale as a parameter.

Weight-compatible with BasicSR 1.4.2 (`basicsr/archs/rrdbnet_arch.py`): the same
state_dict keys and shapes, the same forward, the same initialisation. The one
change is `res_scale`, which BasicSR hardcodes to 0.2 in both residuals; here it
is a constructor argument (default 0.2) so sweeps can tune it.
"""

import torch
from torch import nn
from torch.nn import functional as F

# Scales the trunk supports. Scale 2 and 1 fold pixels into channels first
# (pixel_unshuffle by 2 or 4) and then run the same x4 upsampler as scale 4.
_UNSHUFFLE_FACTOR = {4: 1, 2: 2, 1: 4}


UPSAMPLE_SKIPS = ("none", "nearest", "bilinear", "bicubic")


def _init_residual_convs(convs: list[nn.Conv2d], scale: float) -> None:
    """BasicSR's default_init_weights: kaiming normal, scaled down, zero bias.

    Small initial residual branches keep the 23-block trunk close to identity at
    the start of training, which is why ESRGAN scales them by 0.1.
    """
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight)
        with torch.no_grad():
            conv.weight.mul_(scale)
            if conv.bias is not None:
                conv.bias.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs with a scaled residual.

    Args:
        num_feat: Channels in and out of the block.
        num_grow_ch: Channels each of the first four convs adds to the dense concat.
        res_scale: Multiplier of the block's output before adding the input.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        _init_residual_convs([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place activations only ever touch fresh conv outputs, never `x`.
        x1 = F.leaky_relu(self.conv1(x), 0.2, inplace=True)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2, inplace=True)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2, inplace=True)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2, inplace=True)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * self.res_scale + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and a scaled residual.

    Args:
        num_feat: Channels in and out of the block.
        num_grow_ch: Growth channels of each dense block.
        res_scale: Multiplier of both the dense blocks' residuals and this block's.
    """

    def __init__(self, num_feat: int, num_grow_ch: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        self.rdb1 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch, res_scale=res_scale)
        self.rdb2 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch, res_scale=res_scale)
        self.rdb3 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch, res_scale=res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * self.res_scale + x


class RRDBNet(nn.Module):
    """ESRGAN generator: conv, a trunk of RRDBs, two nearest x2 upsamplings, convs.

    The output is unclamped (the caller clamps for display or metrics). The input
    of scale 2 must have H and W divisible by 2, of scale 1 divisible by 4.

    Args:
        num_in_ch: Image channels in.
        num_out_ch: Image channels out.
        scale: Upscaling factor, 1, 2 or 4.
        num_feat: Trunk channels.
        num_block: Number of RRDBs in the trunk.
        num_grow_ch: Growth channels of the dense blocks.
        res_scale: Residual scale of the dense blocks and the RRDBs (BasicSR: 0.2).
        pixel_unshuffle: True (BasicSR): at scale 2 and 1 fold 2x2 / 4x4 pixels into channels, run the trunk at
            a quarter / sixteenth of the pixels and upsample back with the x4 upsampler. False: the trunk works on
            every input pixel and only the upsamplings the scale needs run (none at scale 1; `conv_up1` and
            `conv_up2` still run, at full resolution, so the weight keys and shapes are those of scale 4). Much
            easier to train for denoising and low-light (per-pixel residuals), 16x the trunk compute at scale 1,
            and not loadable by BasicSR-style loaders. Ignored at scale 4.
        upsample_skip: "none" (ESRGAN, BasicSR-exact), or "nearest" / "bilinear" / "bicubic": add that
            upsampling of the input to the output, so the network learns only the residual detail (as
            Real-ESRGAN's SRVGGNetCompact does). `conv_last` then starts at zero, so the untrained model
            already equals the interpolation; short CPU runs converge much faster. Keys are unchanged. With
            one output channel and several input channels (IR + visible fusion) the skip is the interpolated
            mean of the input channels: the untrained model is the plain average of its inputs.

    Raises:
        ValueError: If `scale` is not 1, 2 or 4, or `upsample_skip` is unknown.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        res_scale: float = 0.2,
        upsample_skip: str = "none",
        pixel_unshuffle: bool = True,
    ):
        super().__init__()
        if scale not in _UNSHUFFLE_FACTOR:
            raise ValueError(f"RRDBNet scale must be one of {sorted(_UNSHUFFLE_FACTOR)}, got {scale!r}")
        if upsample_skip not in UPSAMPLE_SKIPS:
            raise ValueError(f"upsample_skip must be one of {UPSAMPLE_SKIPS}, got {upsample_skip!r}")
        if upsample_skip != "none" and num_in_ch != num_out_ch and num_out_ch != 1:
            raise ValueError("upsample_skip needs num_in_ch == num_out_ch, or one output channel (the skip is then "
                             "the mean of the input channels)")
        # The constructor arguments: what rebuilds this network (generator files and exports store them).
        self.arch = {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "scale": scale, "num_feat": num_feat,
                     "num_block": num_block, "num_grow_ch": num_grow_ch, "res_scale": float(res_scale),
                     "upsample_skip": upsample_skip}
        if not pixel_unshuffle:  # recorded only when off: files of BasicSR-layout models stay as they were
            self.arch["pixel_unshuffle"] = False
        self.upsample_skip = upsample_skip
        self.mean_skip = num_in_ch != num_out_ch  # a plain bool: torch.fx traces no branch on a shape
        self.scale = scale
        self.res_scale = res_scale
        self.unshuffle = _UNSHUFFLE_FACTOR[scale] if pixel_unshuffle else 1
        # Nearest x2 upsamplings before conv_up1 / conv_up2: two at scale 4 and with pixel-unshuffle.
        self.num_upsample = (scale * self.unshuffle).bit_length() - 1
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(
            *[RRDB(num_feat=num_feat, num_grow_ch=num_grow_ch, res_scale=res_scale) for _ in range(num_block)]
        )
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        if upsample_skip != "none":
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, num_in_ch, H, W) -> (B, num_out_ch, H * scale, W * scale)
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)  # (B, num_feat, H / u, W / u)
        feat = feat + self.conv_body(self.body(feat))
        for index, conv in enumerate((self.conv_up1, self.conv_up2)):
            if index < self.num_upsample:
                feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(conv(feat), 0.2, inplace=True)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace=True))
        if self.upsample_skip == "none":
            return out
        if self.mean_skip:  # several inputs, one output: start from their average
            x = x.mean(dim=1, keepdim=True)
        base = F.interpolate(x, scale_factor=self.scale, mode=self.upsample_skip,
                             align_corners=False if self.upsample_skip != "nearest" else None)
        return out + base
