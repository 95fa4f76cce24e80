"""Adversarial losses on discriminator logits, and the D regularisers.

Every loss takes raw logits, (N, 1) or per-pixel (N, 1, H, W) (U-Net
discriminators), and reduces by the mean over all elements, as BasicSR's
`GANLoss` does. Losses are computed in float32 so that a bf16-autocast
discriminator forward gives the same loss as an fp32 one up to the logits.

The discriminator step is expected to compute its terms, add any penalty and
call `backward()` once on the total: nothing here calls `.backward()`, which is
what keeps `gradient_penalty` and `r1_penalty` correct under DDP (their inner
`torch.autograd.grad` does not fire DDP's gradient all-reduce hooks; the one
outer backward does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _mse(logits: Tensor, target: float) -> Tensor:
    return F.mse_loss(logits, torch.full_like(logits, target))


# --- generator terms: (fake_logits, real_logits) -> scalar -------------------


def vanilla_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """Non-saturating GAN loss for G: BCE(D(fake), 1). `real` is unused."""
    return _bce(fake, 1.0)


def relativistic_g_loss(fake: Tensor, real: Tensor) -> Tensor:
    """Relativistic average GAN loss for G, as BasicSR's ESRGANModel.

    (BCE(real - mean(fake), 0) + BCE(fake - mean(real), 1)) / 2, with the real
    logits detached so that G's step does not train D.
    """
    real = real.detach()
    return (_bce(real - fake.mean(), 0.0) + _bce(fake - real.mean(), 1.0)) / 2


def lsgan_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """Least-squares GAN loss for G: MSE(D(fake), 1). `real` is unused."""
    return _mse(fake, 1.0)


def hinge_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """Hinge GAN loss for G: -mean(D(fake)). `real` is unused."""
    return -fake.mean()


def wgan_g_loss(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """Wasserstein loss for G: -mean(D(fake)). `real` is unused."""
    return -fake.mean()


# --- discriminator terms: (real_logits, fake_logits) -> (real term, fake term)


def vanilla_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """BCE(D(real), 1), BCE(D(fake), 0)."""
    return _bce(real, 1.0), _bce(fake, 0.0)


def relativistic_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Relativistic average D terms, as BasicSR's ESRGANModel.

    l_d_real = BCE(real - mean(fake), 1) / 2 with the fake logits' mean
    detached; l_d_fake = BCE(fake - mean(real), 0) / 2 with the real logits'
    mean detached. BasicSR gets these detachments from two separate D forwards
    and backwards; here one forward of each and one backward of the sum give
    the same gradients.
    """
    l_real = _bce(real - fake.detach().mean(), 1.0) * 0.5
    l_fake = _bce(fake - real.detach().mean(), 0.0) * 0.5
    return l_real, l_fake


def lsgan_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """MSE(D(real), 1), MSE(D(fake), 0)."""
    return _mse(real, 1.0), _mse(fake, 0.0)


def hinge_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """mean(relu(1 - D(real))), mean(relu(1 + D(fake)))."""
    return F.relu(1.0 - real).mean(), F.relu(1.0 + fake).mean()


def wgan_d_loss(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """-mean(D(real)), mean(D(fake)); pair it with `gradient_penalty`."""
    return -real.mean(), fake.mean()


class AdversarialMode(NamedTuple):
    """The generator and discriminator loss functions of one GAN objective."""

    generator: Callable[[Tensor, Tensor | None], Tensor]
    discriminator: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    generator_needs_real: bool


ADVERSARIAL_MODES = {
    "vanilla": AdversarialMode(vanilla_g_loss, vanilla_d_loss, generator_needs_real=False),
    "relativistic": AdversarialMode(relativistic_g_loss, relativistic_d_loss, generator_needs_real=True),
    "lsgan": AdversarialMode(lsgan_g_loss, lsgan_d_loss, generator_needs_real=False),
    "hinge": AdversarialMode(hinge_g_loss, hinge_d_loss, generator_needs_real=False),
    "wgan": AdversarialMode(wgan_g_loss, wgan_d_loss, generator_needs_real=False),
}


def _get_mode(mode: str) -> AdversarialMode:
    if mode not in ADVERSARIAL_MODES:
        raise ValueError(f"Unknown adversarial mode {mode!r}; valid modes: {sorted(ADVERSARIAL_MODES)}")
    return ADVERSARIAL_MODES[mode]


def generator_adversarial_loss(mode: str, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
    """Adversarial loss of the generator.

    Args:
        mode: One of `ADVERSARIAL_MODES`.
        fake_logits: D's logits on generated images (not detached: G learns
            through them), (N, 1) or (N, 1, H, W).
        real_logits: D's logits on real images; required by "relativistic",
            ignored otherwise. Detached inside.

    Returns:
        Scalar float32 loss (weighting is the caller's).

    Raises:
        ValueError: Unknown mode, or "relativistic" without `real_logits`.
    """
    spec = _get_mode(mode)
    if spec.generator_needs_real and real_logits is None:
        raise ValueError(f"Adversarial mode {mode!r} needs real_logits for the generator loss")
    real = None if real_logits is None else real_logits.float()
    return spec.generator(fake_logits.float(), real)


def discriminator_adversarial_loss(mode: str, real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Adversarial loss of the discriminator, as (real term, fake term).

    Args:
        mode: One of `ADVERSARIAL_MODES`.
        real_logits: D's logits on real images.
        fake_logits: D's logits on generated images (computed from detached
            generator outputs, so that D's step does not train G).

    Returns:
        (l_d_real, l_d_fake), scalar float32 tensors; the caller sums them
        (plus any penalty) and calls backward once.

    Raises:
        ValueError: Unknown mode.
    """
    return _get_mode(mode).discriminator(real_logits.float(), fake_logits.float())


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty, mean((||grad_x D(x)||_2 - 1)^2) at random interpolates.

    Each sample gets its own uniform mixing weight between its real and fake
    image. The gradient is taken with `create_graph=True` so the penalty
    backpropagates into D's parameters in the caller's single backward.

    Args:
        discriminator: D (a module, DDP-wrapped or not), called once on the
            interpolates; may run under bf16 autocast.
        real: Real images, (N, C, H, W).
        fake: Generated images, same shape (detached inside).

    Returns:
        Scalar float32 penalty (weight it with gp_weight in the caller).
    """
    real = real.detach()
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    interpolates = (alpha * real + (1 - alpha) * fake.detach().to(real.dtype)).requires_grad_(True)
    logits = discriminator(interpolates)
    (grads,) = torch.autograd.grad(outputs=logits.float().sum(), inputs=interpolates, create_graph=True)
    # float32 for the norm: under autocast the gradient may come back in bf16.
    grads = grads.float().flatten(start_dim=1)
    # eps keeps the double-backward finite where a gradient is exactly zero.
    grad_norm = torch.sqrt(grads.pow(2).sum(dim=1) + 1e-12)
    return ((grad_norm - 1.0) ** 2).mean()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1 penalty, mean over samples of ||grad_x D(x)||^2 on real images.

    Args:
        real_logits: D's logits on `real_images`.
        real_images: The real batch, on which `requires_grad_(True)` was set
            before the D forward that produced `real_logits`.

    Returns:
        Scalar float32 penalty (the usual gamma / 2 weighting is the caller's).

    Raises:
        ValueError: `real_images` does not require grad.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty needs real_images.requires_grad_(True) set before the discriminator forward")
    (grads,) = torch.autograd.grad(outputs=real_logits.float().sum(), inputs=real_images, create_graph=True)
    return grads.float().flatten(start_dim=1).pow(2).sum(dim=1).mean()
