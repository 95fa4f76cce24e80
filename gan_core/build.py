"""Build the models, losses and optimizers of a run from its config."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from gan_core.checkpoint import read_generator_weights
from gan_core.config import Config
from gan_core.losses import LPIPS, VGGFeatureLoss
from gan_core.models import build_discriminator, build_generator
from gan_core.models.basicsr import strip_wrapper_prefixes
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
        module = VGGFeatureLoss(layers=loss.perceptual_layers or {"conv5_4": 1.0},
                                weights_path=loss.perceptual_weights_path)
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
        # Only the weights: this run's generator.* (res_scale, upsample_skip) is the architecture they go into.
        weights, _ = read_generator_weights(init_generator, device=device)
        weights = strip_wrapper_prefixes(weights)
        _check_same_architecture(weights, generator, init_generator)
        generator.load_state_dict(weights)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator = generator.to(memory_format=memory_format)
    g_optimizer = _adam(generator, cfg.optim.g_lr, cfg)
    state = TrainState(
        generator=generator,
        g_optimizer=g_optimizer,
        g_scheduler=build_lr_scheduler(g_optimizer, cfg.schedule, cfg.train.total_steps,
                                       gan_start=_gan_start(cfg), gan_lr_scale=cfg.schedule.gan_g_lr_scale),
    )
    if cfg.train.ema_decay > 0:
        state.generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    if cfg.gan_enabled:
        # D sees G's outputs and the targets: as many channels as G puts out (1 for gray tasks and fusion).
        discriminator = build_discriminator(**cfg.discriminator.kwargs(), num_in_ch=cfg.generator.num_out_ch)
        discriminator = discriminator.to(device, memory_format=memory_format)
        d_optimizer = _adam(discriminator, cfg.optim.d_lr, cfg)
        state.discriminator = discriminator
        state.d_optimizer = d_optimizer
        state.d_scheduler = build_lr_scheduler(d_optimizer, cfg.schedule, cfg.train.total_steps,
                                               gan_start=_gan_start(cfg))
        state.perceptual = build_perceptual(cfg, device)
        if state.perceptual is not None:
            state.perceptual = state.perceptual.to(memory_format=memory_format)
    return state


def _adam(model: nn.Module, lr: float, cfg: Config) -> torch.optim.Adam:
    """Adam as BasicSR's recipes set it; `optim.fused` picks torch's fused kernel over the foreach one."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                            fused=cfg.optim.fused or None)


def _gan_start(cfg: Config) -> int:
    """The first step of the GAN phase; a pixel-only run has none (its schedule is never split)."""
    return cfg.train.pretrain_steps if cfg.gan_enabled else cfg.train.total_steps


def _check_same_architecture(weights: dict[str, torch.Tensor], generator: nn.Module, source: str | Path) -> None:
    ours = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
        raise ValueError(
            f"train.init_from={source} holds a generator of another architecture than generator.* in the config "
            f"(first differences: {differing}); make generator.num_feat/num_block/num_grow_ch/scale match it"
        )
