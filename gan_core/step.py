"""The whole training step: one G step, one D step, the EMA, and the phase logic around them.

Design notes
- Steps are functions of (models, optimizers, batch, config) returning named losses; no hidden state.
- D's `requires_grad` is never toggled (that breaks `torch.compile` on D). Instead the G step's backward
  names G's parameters as its only `inputs`: autograd goes through D to reach G's output but computes no D
  weight gradient (half the FLOPs of D's backward: a conv's input and weight gradients cost the same), and
  D, under DDP's `no_sync()`, syncs nothing.
- D is called separately on real and fake batches (BatchNorm statistics stay per batch, as BasicSR);
  under DDP that needs `broadcast_buffers=False`, which jobs/ sets.
- The gradient penalty uses `autograd.grad(create_graph=True)` and one backward of the total D loss,
  which is what keeps it correct under DDP.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from gan_core.config import Config
from gan_core.tasks import build_task
from gan_core.losses import (
    PIXEL_LOSSES,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    gradient_penalty,
    r1_penalty,
)

Batch = tuple[torch.Tensor, torch.Tensor]  # (lq (B, C, h, w), gt (B, C, h*s, w*s)), floats in [0, 1]


@dataclass
class TrainState:
    """What one training run holds. Models may be DDP-wrapped; `unwrap` gives the plain module."""

    generator: nn.Module
    g_optimizer: torch.optim.Optimizer
    g_scheduler: torch.optim.lr_scheduler.LRScheduler
    discriminator: nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    d_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    generator_ema: nn.Module | None = None
    perceptual: nn.Module | None = None
    step: int = 0  # G steps done


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the batch's device type, or nothing.

    Without autocast's cast cache: it would save recasting a network's weights when the network runs twice in
    one autocast region (D in its step), a few MB, and it must be off for a step captured in a CUDA graph.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


def _clip(model: nn.Module, max_norm: float | None) -> torch.Tensor | None:
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def g_step(
    generator: nn.Module,
    g_optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: Config,
    *,
    discriminator: nn.Module | None = None,
    perceptual: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One generator update.

    Args:
        generator: G (plain, DDP or compiled).
        g_optimizer: G's optimizer.
        batch: (lq, gt).
        cfg: the run config (loss weights, precision, clipping).
        discriminator: D for the adversarial term; None in the pixel-only phase.
        perceptual: LPIPS or VGG feature loss module, or None.

    Returns:
        (losses, fake): detached scalar losses named `g/pix`, `g/percep`, `g/adv`, `g/total`, and G's
        output, detached, for the D step.
    """
    lq, gt = batch
    loss_cfg = cfg.loss
    with autocast(lq.device, cfg.train.bf16):
        fake = generator(lq)  # (B, C, H, W)
    fake32 = fake.float()
    losses: dict[str, torch.Tensor] = {}
    # The task's content term: the pixel loss against the target, or (fusion) FusionGAN's IR-intensity and
    # visible-gradient loss against the inputs.
    total = loss_cfg.pixel_weight * build_task(cfg).content_loss(fake32, lq, gt, PIXEL_LOSSES[loss_cfg.pixel])
    losses["g/pix"] = total
    if perceptual is not None and loss_cfg.perceptual_weight > 0:
        with autocast(lq.device, cfg.train.bf16):  # the feature network in bf16 too; its criterion is float32
            percep = perceptual(fake, gt).float().mean()
        losses["g/percep"] = loss_cfg.perceptual_weight * percep
        total = total + losses["g/percep"]
    if discriminator is not None and loss_cfg.adversarial_weight > 0:
        with autocast(lq.device, cfg.train.bf16), _no_sync(discriminator):
            fake_logits = discriminator(fake).float()
            real_logits = None
            if loss_cfg.adversarial == "relativistic":
                with torch.no_grad():
                    real_logits = discriminator(gt).float()
        losses["g/adv"] = loss_cfg.adversarial_weight * generator_adversarial_loss(
            loss_cfg.adversarial, fake_logits, real_logits
        )
        total = total + losses["g/adv"]
    g_optimizer.zero_grad(set_to_none=True)
    total.backward(inputs=[p for p in generator.parameters() if p.requires_grad])  # no D weight grads
    grad_norm = _clip(generator, cfg.optim.grad_clip)
    g_optimizer.step()
    losses["g/total"] = total
    if grad_norm is not None:
        losses["g/grad_norm"] = grad_norm
    return {k: v.detach() for k, v in losses.items()}, fake.detach()


def d_step(
    discriminator: nn.Module,
    d_optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    cfg: Config,
) -> dict[str, torch.Tensor]:
    """One discriminator update on a real and a (detached) fake batch.

    Returns:
        Detached scalars `d/real`, `d/fake` (the two adversarial terms), `d/gp`, `d/r1` when on,
        `d/total`, and the mean logits `d/real_logit`, `d/fake_logit`.
    """
    loss_cfg = cfg.loss
    d_optimizer.zero_grad(set_to_none=True)
    real = real.detach()
    if loss_cfg.r1_weight > 0:
        real = real.requires_grad_(True)
    fake = fake.detach()
    with autocast(real.device, cfg.train.bf16):
        real_logits = discriminator(real).float()
        fake_logits = discriminator(fake).float()
    l_real, l_fake = discriminator_adversarial_loss(loss_cfg.adversarial, real_logits, fake_logits)
    losses = {"d/real": l_real, "d/fake": l_fake}
    total = l_real + l_fake
    if loss_cfg.gp_weight > 0:
        with autocast(real.device, cfg.train.bf16):
            losses["d/gp"] = gradient_penalty(discriminator, real.detach(), fake)
        total = total + loss_cfg.gp_weight * losses["d/gp"]
    if loss_cfg.r1_weight > 0:
        losses["d/r1"] = r1_penalty(real_logits, real)
        total = total + 0.5 * loss_cfg.r1_weight * losses["d/r1"]
    total.backward()
    grad_norm = _clip(discriminator, cfg.optim.grad_clip)
    d_optimizer.step()
    losses["d/total"] = total
    losses["d/real_logit"] = real_logits.mean()
    losses["d/fake_logit"] = fake_logits.mean()
    if grad_norm is not None:
        losses["d/grad_norm"] = grad_norm
    return {k: v.detach() for k, v in losses.items()}


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay for update number `step` (0-based), warmed up as min(decay, (1 + t) / (10 + t)).

    Without the warm-up the average would be dominated by the random initial weights for thousands
    of steps, which makes short runs (and early validations) meaningless.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, in one foreach call; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in unwrap(model).parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), unwrap(model).buffers()):
        ema_buffer.copy_(buffer)


def phase(step: int, cfg: Config) -> str:
    """`pretrain` (pixel only), `d_warmup` (D only) or `gan`, for the G step with index `step`."""
    if step < cfg.train.pretrain_steps:
        return "pretrain"
    if step < cfg.train.pretrain_steps + cfg.train.d_warmup_steps:
        return "d_warmup"
    return "gan"


def train_step(state: TrainState, batches: Iterator[Batch], cfg: Config) -> dict[str, torch.Tensor]:
    """Everything one global step does: the phase's G and D updates, the EMA, the schedulers.

    Args:
        state: models and optimizers; `state.step` is advanced by one.
        batches: an endless iterator of (lq, gt) already on the model's device.
        cfg: the run config.

    Returns:
        Detached scalar losses of this step, plus `lr/g` and `lr/d`.
    """
    if cfg.train.compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()  # the CUDA graphs' outputs of the last step may be reused
    current = phase(state.step, cfg)
    gan = current != "pretrain" and state.discriminator is not None
    losses: dict[str, torch.Tensor] = {}
    lq, gt = next(batches)
    if current == "d_warmup":
        with torch.no_grad(), autocast(lq.device, cfg.train.bf16):
            fake = state.generator(lq)
    else:
        g_losses, fake = g_step(
            state.generator,
            state.g_optimizer,
            (lq, gt),
            cfg,
            discriminator=state.discriminator if gan else None,
            perceptual=state.perceptual if gan else None,
        )
        losses.update(g_losses)
        if state.generator_ema is not None:
            ema_update(state.generator_ema, state.generator, ema_decay_at(state.step, cfg.train.ema_decay))
    if gan:
        losses.update(d_step(state.discriminator, state.d_optimizer, gt, fake, cfg))
        for _ in range(cfg.train.d_steps_per_g - 1):
            lq, gt = next(batches)
            with torch.no_grad(), autocast(lq.device, cfg.train.bf16):
                fake = state.generator(lq)
            losses.update(d_step(state.discriminator, state.d_optimizer, gt, fake, cfg))
    losses["lr/g"] = torch.tensor(state.g_optimizer.param_groups[0]["lr"])
    state.g_scheduler.step()
    if state.d_optimizer is not None:
        losses["lr/d"] = torch.tensor(state.d_optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():
            # D does not step during pretraining, but its schedule follows the global step all the same.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            state.d_scheduler.step()
    state.step += 1
    return losses
