"""Pixel losses between a generated image and its ground truth."""

from __future__ import annotations

import torch


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error.

    Args:
        pred: Generated images, (N, C, H, W).
        target: Ground truth, same shape.

    Returns:
        Scalar mean of |pred - target|.
    """
    return torch.nn.functional.l1_loss(pred, target)


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Charbonnier loss, a differentiable L1: mean of sqrt((pred - target)^2 + eps).

    Same definition as BasicSR's `charbonnier_loss` with mean reduction.

    Args:
        pred: Generated images, (N, C, H, W).
        target: Ground truth, same shape.
        eps: Added under the square root; keeps the gradient finite at zero error.

    Returns:
        Scalar loss.
    """
    # float32: under bf16 autocast the generator output is bf16, and squaring
    # small differences in bf16 would round them to 8 mantissa bits.
    return torch.sqrt((pred.float() - target.float()) ** 2 + eps).mean()


PIXEL_LOSSES = {"l1": l1_loss, "charbonnier": charbonnier_loss}
