"""Losses: pixel, adversarial (+ gradient penalty, R1) and perceptual."""

from gan_core.losses.adversarial import (
    ADVERSARIAL_MODES,
    AdversarialMode,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    gradient_penalty,
    r1_penalty,
)
from gan_core.losses.perceptual import LPIPS, VGGFeatureLoss, load_lpips_backbone
from gan_core.losses.pixel import PIXEL_LOSSES, charbonnier_loss, l1_loss

__all__ = [
    "ADVERSARIAL_MODES",
    "LPIPS",
    "PIXEL_LOSSES",
    "AdversarialMode",
    "VGGFeatureLoss",
    "charbonnier_loss",
    "discriminator_adversarial_loss",
    "generator_adversarial_loss",
    "gradient_penalty",
    "l1_loss",
    "load_lpips_backbone",
    "r1_penalty",
]
