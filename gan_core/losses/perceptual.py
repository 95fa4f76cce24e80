"""Perceptual losses on frozen ImageNet backbones: LPIPS and VGG19 features.

Both take images in [0, 1], (N, 3, H, W), and load their backbone weights only
from disk through `gan_core.weights.find_weights`: nothing downloads. The
`random_backbone=True` escape hatch exists for tests on machines without the
files; an LPIPS built that way reports `metric_name == "lpips_random"` so its
numbers can never be logged as real LPIPS.
"""

from __future__ import annotations

import os
import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import nn

from gan_core.config import VGG19_LAYER_NAMES
from gan_core.weights import find_weights

LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
VGG19_FILE = "vgg19-dcbbabf1.pth"

# VGG19_LAYER_NAMES (torchvision's vgg19().features, in order) lives in gan_core.config so that
# validating a config imports no torch; re-exported here.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_state_dict(path: os.PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _freeze(module: nn.Module) -> None:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)


def load_lpips_backbone(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """Copy torchvision `features.N.*` tensors into lpips' `sliceK.N.*` modules.

    lpips splits torchvision's `features` Sequential into slices but keeps each
    layer's index as its name inside the slice, so `features.3.weight` is
    `slice2.3.weight` for AlexNet. The slice of each index is read off the
    backbone itself, so the map stays right for any lpips trunk.

    Args:
        backbone: lpips' trunk (`lpips.LPIPS(...).net`).
        state_dict: A torchvision model's state dict (its classifier keys are ignored).
        source: Where the state dict came from, for error messages.

    Returns:
        The number of tensors copied (every backbone parameter and buffer).

    Raises:
        ValueError: The state dict lacks a backbone tensor or has a wrong shape.
    """
    mapped = {}
    for name, tensor in backbone.state_dict().items():
        _slice, index, leaf = name.split(".", 2)  # "slice2", "3", "weight"
        key = f"features.{index}.{leaf}"
        if key not in state_dict:
            raise ValueError(f"{source} has no {key!r} (needed for lpips' {name}); is it the right backbone file?")
        if state_dict[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)}, lpips' {name} needs {tuple(tensor.shape)}"
            )
        mapped[name] = state_dict[key]
    backbone.load_state_dict(mapped, strict=True)
    return len(mapped)


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018) on images in [0, 1], frozen.

    Wraps `lpips.LPIPS` built with `pnet_rand=True`, so that its constructor
    does not download the torchvision backbone; the calibrated linear layers
    ship inside the lpips package. The backbone is then loaded from the file
    that `find_weights` locates.

    Args:
        net: "alex" (the usual metric) or "vgg" (VGG16 trunk, often used as a loss).
        weights_path: File or directory with the torchvision backbone
            (`alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth`); else
            $GAN_CORE_WEIGHTS_DIR, then the torch hub cache are searched.
        random_backbone: Skip the backbone weights (tests only); the module then
            reports `metric_name == "lpips_random"`.

    Raises:
        ValueError: Unknown `net`.
        MissingWeightsError: Backbone file not found (and not random_backbone).
    """

    def __init__(
        self, *, net: str = "alex", weights_path: str | os.PathLike | None = None, random_backbone: bool = False
    ):
        super().__init__()
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"Unknown LPIPS net {net!r}; valid: {sorted(LPIPS_BACKBONE_FILES)}")
        # Find the file before building anything, so a missing file fails fast.
        path = None if random_backbone else find_weights(LPIPS_BACKBONE_FILES[net], weights_path)
        with warnings.catch_warnings():
            # lpips 0.1.4 still passes torchvision's deprecated `pretrained=` flag.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            load_lpips_backbone(self.model.net, _load_state_dict(path), source=str(path))
        self.net_name = net
        self.weights_file = path
        self.metric_name = "lpips_random" if random_backbone else "lpips"
        _freeze(self)

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: lpips' linear layers have dropout, and a parent module's
        # .train() must not make the metric (or loss) stochastic.
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance.

        Args:
            pred: Images in [0, 1], (N, 3, H, W).
            target: Images in [0, 1], same shape.

        Returns:
            (N,) distances; differentiable with respect to the inputs.
        """
        return self.model(pred, target, normalize=True).reshape(pred.shape[0])


def vgg19_features(*, num_layers: int = len(VGG19_LAYER_NAMES)) -> nn.Sequential:
    """The first `num_layers` layers of torchvision's `vgg19().features`, randomly initialised.

    Built here rather than through `torchvision.models.vgg19()` so that the
    3x4096 classifier (about 120M parameters, 0.5 GB) is never allocated.
    Layer indices match torchvision's, so its `features.N.*` keys load as `N.*`.

    Args:
        num_layers: How many layers (conv, relu, pool each count one) to keep.

    Returns:
        nn.Sequential of Conv2d(3x3, padding 1) / ReLU(inplace) / MaxPool2d(2, 2),
        initialised as torchvision initialises VGG.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for name in VGG19_LAYER_NAMES[:num_layers]:
        if name.startswith("conv"):
            out_channels = 64 * 2 ** min(int(name[4]) - 1, 3)  # conv1: 64, conv2: 128, conv3: 256, conv4/5: 512
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            # torchvision's VGG init: with PyTorch's default init a random
            # (test-only) backbone's deep features shrink to ~1e-4.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            in_channels = out_channels
        elif name.startswith("relu"):
            layers.append(nn.ReLU(inplace=True))
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def load_vgg19_features(features: nn.Sequential, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """Load torchvision VGG19 `features.N.*` tensors into (a prefix of) `vgg19_features()`.

    Args:
        features: Output of `vgg19_features`.
        state_dict: torchvision's vgg19 state dict (classifier keys ignored).
        source: Where the state dict came from, for error messages.

    Returns:
        The number of tensors loaded.

    Raises:
        ValueError: A needed tensor is missing or has the wrong shape.
    """
    mapped = {}
    for name, tensor in features.state_dict().items():
        key = f"features.{name}"
        if key not in state_dict or state_dict[key].shape != tensor.shape:
            found = tuple(state_dict[key].shape) if key in state_dict else "missing"
            raise ValueError(
                f"{source}: {key} is {found}, expected shape {tuple(tensor.shape)}; "
                "is it torchvision's VGG19 (vgg19-dcbbabf1.pth)?"
            )
        mapped[name] = state_dict[key]
    features.load_state_dict(mapped, strict=True)
    return len(mapped)


class VGGFeatureLoss(nn.Module):
    """VGG19 feature-matching loss over one or several layers, as BasicSR's PerceptualLoss.

    Equivalent to BasicSR's `PerceptualLoss(layer_weights=layers, vgg_type="vgg19", use_input_norm=True,
    range_norm=False, criterion=criterion)`: ImageNet mean/std input normalisation, features taken before
    the ReLU at `convX_Y`, the target's features computed from a detached target, and the loss
    sum_k layers[k] * criterion(features_k(pred), features_k(target)). ESRGAN uses {"conv5_4": 1};
    Real-ESRGAN {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1, "conv5_4": 1}.

    Args:
        layer: the single layer compared (weight 1) when `layers` is not given, e.g. "conv5_4".
        layers: VGG19 layer name -> weight; overrides `layer`.
        weights_path: File or directory with `vgg19-dcbbabf1.pth` (torchvision's
            VGG19); else $GAN_CORE_WEIGHTS_DIR, then the torch hub cache.
        criterion: "l1" (mean), "l2" (mean squared) or "fro" (Frobenius norm
            of the feature difference over the whole batch, as BasicSR).
        random_backbone: Skip the weights (tests only).

    Raises:
        ValueError: Unknown layer (the valid names are listed), negative weight, or unknown criterion.
        MissingWeightsError: Weights file not found (and not random_backbone).
    """

    def __init__(
        self,
        *,
        layer: str = "conv5_4",
        layers: dict[str, float] | None = None,
        weights_path: str | os.PathLike | None = None,
        criterion: str = "l1",
        random_backbone: bool = False,
    ):
        super().__init__()
        layers = dict(layers) if layers is not None else {layer: 1.0}
        unknown = sorted(set(layers) - set(VGG19_LAYER_NAMES))
        if unknown or not layers:
            raise ValueError(f"Unknown VGG19 layer(s) {unknown}; valid: {list(VGG19_LAYER_NAMES)}")
        if any(weight < 0 for weight in layers.values()):
            raise ValueError(f"VGG19 layer weights must be >= 0, got {layers}")
        if criterion not in FEATURE_CRITERIA:
            raise ValueError(f"Unknown criterion {criterion!r}; valid: {sorted(FEATURE_CRITERIA)}")
        path = None if random_backbone else find_weights(VGG19_FILE, weights_path)
        # Only the layers up to the deepest one asked for are built and run; BasicSR truncates the same way.
        deepest = max(VGG19_LAYER_NAMES.index(name) for name in layers)
        self.features = vgg19_features(num_layers=deepest + 1)
        if path is not None:
            load_vgg19_features(self.features, _load_state_dict(path), source=str(path))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # In network order, so one pass collects them all.
        self.layers = {name: float(layers[name]) for name in VGG19_LAYER_NAMES if name in layers}
        self.layer = next(reversed(self.layers))  # the deepest
        self.criterion = criterion
        self.weights_file = path
        _freeze(self)

    def train(self, mode: bool = True) -> VGGFeatureLoss:
        return super().train(False)  # a frozen feature extractor: never train mode

    def extract_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """VGG19 features at every layer of `self.layers`, of images in [0, 1], (N, 3, H, W)."""
        x = (images - self.mean) / self.std
        wanted = {VGG19_LAYER_NAMES.index(name): name for name in self.layers}
        features = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in wanted:
                # The next layer is an in-place ReLU: keep the pre-activation (BasicSR clones too).
                features[wanted[index]] = x.clone() if index + 1 < len(self.features) else x
        return features

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """VGG19 features at `self.layer` (the deepest layer compared) of images in [0, 1], (N, 3, H, W)."""
        return self.extract_all(images)[self.layer]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted feature distance between `pred` and `target`.

        Args:
            pred: Generated images in [0, 1], (N, 3, H, W).
            target: Ground truth in [0, 1], same shape (detached inside).

        Returns:
            Scalar loss: sum over layers of weight * criterion (the perceptual weight is the caller's).
        """
        criterion = FEATURE_CRITERIA[self.criterion]
        pred_features = self.extract_all(pred)
        with torch.no_grad():
            target_features = self.extract_all(target.detach())
        return sum(weight * criterion(pred_features[name], target_features[name])
                   for name, weight in self.layers.items())


# Feature criteria in float32: under bf16 autocast the features are bf16.
def _l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(x.float(), y.float())


def _l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x.float(), y.float())


def _frobenius(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.float() - y.float())


FEATURE_CRITERIA = {"l1": _l1, "l2": _l2, "fro": _frobenius}
