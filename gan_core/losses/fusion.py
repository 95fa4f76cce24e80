"""FusionGAN's content loss (Ma, Yu, Liang, Li & Jiang 2019, "FusionGAN: A generative adversarial network for
infrared and visible image fusion", Information Fusion 48, eq. 5):

    L_content = 1/(HW) (||F - IR||_F^2 + xi ||grad F - grad VI||_F^2)

the fused image keeps the infrared intensities and the visible image's gradients (texture). The gradient is
the 3x3 Laplacian, as in the authors' code.

`max_content_loss` is SeAFusion's (Tang, Yuan & Ma 2022, "Image fusion in the loop of high-level vision tasks",
Information Fusion 82, eqs. 3-5): the fused image keeps the brighter of the two intensities and the stronger of
the two Sobel gradients at every pixel, so edges of both sources survive (what Q^AB/F measures):

    L = 1/(HW) (||F - max(IR, VI)||_1 + xi || |grad F| - max(|grad IR|, |grad VI|) ||_1),  |grad| = |Gx| + |Gy|
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def laplacian(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> its 3x3 Laplacian, same size (zero padding, as FusionGAN's tf.nn.conv2d 'SAME')."""
    kernel = torch.tensor(LAPLACIAN, dtype=img.dtype, device=img.device).view(1, 1, 3, 3)
    return F.conv2d(img, kernel, padding=1)


def fusion_content_loss(fused: torch.Tensor, ir: torch.Tensor, visible: torch.Tensor, *,
                        intensity_weight: float = 1.0, gradient_weight: float = 5.0) -> torch.Tensor:
    """intensity_weight * mean (F - IR)^2 + gradient_weight * mean (lap F - lap VI)^2, over all pixels.

    Args:
        fused, ir, visible: (B, 1, H, W) floats in [0, 1].
        intensity_weight: weight of the IR intensity term.
        gradient_weight: FusionGAN's xi (5 in the paper).
    """
    intensity = F.mse_loss(fused, ir)
    gradient = F.mse_loss(laplacian(fused), laplacian(visible))
    return intensity_weight * intensity + gradient_weight * gradient


def sobel_magnitude(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> |Gx| + |Gy| of the 3x3 Sobel filters, same size (replicate padding: no edge at the border)."""
    kernel_x = torch.tensor(SOBEL_X, dtype=img.dtype, device=img.device).view(1, 1, 3, 3)
    kernels = torch.cat((kernel_x, kernel_x.transpose(2, 3)))
    grads = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernels)
    return grads.abs().sum(dim=1, keepdim=True)


def max_content_loss(fused: torch.Tensor, ir: torch.Tensor, visible: torch.Tensor, *,
                     intensity_weight: float = 1.0, gradient_weight: float = 10.0) -> torch.Tensor:
    """intensity_weight * mean |F - max(IR, VI)| + gradient_weight * mean | |grad F| - max(|grad IR|, |grad VI|) |.

    Args:
        fused, ir, visible: (B, 1, H, W) floats in [0, 1].
        intensity_weight: weight of the intensity term (SeAFusion: 1).
        gradient_weight: weight of the texture term (SeAFusion: 10).
    """
    intensity = F.l1_loss(fused, torch.maximum(ir, visible))
    texture = F.l1_loss(sobel_magnitude(fused), torch.maximum(sobel_magnitude(ir), sobel_magnitude(visible)))
    return intensity_weight * intensity + gradient_weight * texture
