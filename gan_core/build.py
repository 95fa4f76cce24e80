"""Build the models, losses and optimizers of a run from its config."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gan_core.checkpoint import load_generator
from gan_core.config import Config
from gan_core.losses import LPIPS, VGGFeatureLoss
from gan_core.models import build_discriminator, build_generator
from gan_core.schedules import build_lr_scheduler
from gan_core.step import TrainState


def build_perceptual(cfg: Config, device: torch.device) -> nn.Module | None:
    """The configured perceptual loss, or None.

    Raises:
        MissingWeightsError: the backbone weights are not on this machine (the message says how to provide them).
    """
    loss = cfg.loss
    if loss.perceptual == "none" or loss.perceptual_weight == 0:
        return None
    if loss.perceptual == "lpips":
        module = LPIPS(net=loss.lpips_net, weights_path=loss.perceptual_weights_path)
    else:
        module = VGGFeatureLoss(layer="conv5_4", weights_path=loss.perceptual_weights_path)
    return module.to(device).eval()


def build_state(cfg: Config, device: torch.device, init_generator: str | Path | None = None) -> TrainState:
    """Models, optimizers and schedulers for `cfg`, on `device`, not yet wrapped for DDP.

    Args:
        cfg: the run config.
        device: where the models live.
        init_generator: local path of pretrained G weights (our checkpoint or a BasicSR .pth);
            defaults to `cfg.train.init_from` (jobs/ resolves MLflow URIs to a path first).

    Returns:
        A TrainState at step 0.
    """
    generator = build_generator(**cfg.generator.model_dump()).to(device)
    init_generator = init_generator or cfg.train.init_from
    if init_generator:
        pretrained = load_generator(init_generator, device=device)
        _check_same_architecture(pretrained, generator, init_generator)
        generator.load_state_dict(pretrained.state_dict())
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator = generator.to(memory_format=memory_format)
    g_optimizer = torch.optim.Adam(
        generator.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    state = TrainState(
        generator=generator,
        g_optimizer=g_optimizer,
        g_scheduler=build_lr_scheduler(g_optimizer, cfg.schedule, cfg.train.total_steps),
    )
    if cfg.train.ema_decay > 0:
        state.generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    if cfg.gan_enabled:
        discriminator = build_discriminator(**cfg.discriminator.kwargs()).to(device, memory_format=memory_format)
        d_optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=cfg.optim.d_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        state.discriminator = discriminator
        state.d_optimizer = d_optimizer
        state.d_scheduler = build_lr_scheduler(d_optimizer, cfg.schedule, cfg.train.total_steps)
        state.perceptual = build_perceptual(cfg, device)
    return state


def _check_same_architecture(pretrained: nn.Module, generator: nn.Module, source: str | Path) -> None:
    ours = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in pretrained.state_dict().items()}
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
        raise ValueError(
            f"train.init_from={source} holds a generator of another architecture than generator.* in the config "
            f"(first differences: {differing}); make generator.num_feat/num_block/num_grow_ch/scale match it"
        )
