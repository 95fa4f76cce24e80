"""Pixel and adversarial losses, gradient penalty and R1 (perceptual losses: test_perceptual.py)."""

import math
import socket

import pytest
import torch
from torch import nn

from gan_core.losses import (
    ADVERSARIAL_MODES,
    charbonnier_loss,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    gradient_penalty,
    l1_loss,
    r1_penalty,
)

MODES = ["vanilla", "relativistic", "lsgan", "hinge", "wgan"]


def tiny_discriminator(per_pixel: bool) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, padding=1)]  # (N, 1, H, W)
    if not per_pixel:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (N, 1)
    return nn.Sequential(*layers)


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w everywhere, so the penalties are known exactly."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(dim=1, keepdim=True)  # (N, 1)


def finite_nonzero_grads(module: nn.Module) -> bool:
    """Every weight got a finite gradient and some are nonzero (a bias may get none: penalties on the input
    gradient do not depend on the last layer's bias)."""
    weights_have_grads = all(p.grad is not None for p in module.parameters() if p.dim() > 1)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    finite = all(torch.isfinite(g).all() for g in grads)
    return weights_have_grads and finite and any(g.abs().sum() > 0 for g in grads)


# --- pixel --------------------------------------------------------------------


def test_pixel_losses():
    pred, target = torch.tensor([[0.0, 0.5], [1.0, 0.25]]), torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    assert l1_loss(pred, target).item() == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    want = sum(math.sqrt(d * d + 1e-3) for d in (0.5, 0.0, 1.0, 0.25)) / 4
    assert charbonnier_loss(pred, target, eps=1e-3).item() == pytest.approx(want, rel=1e-6)
    leaf = target.clone().requires_grad_(True)
    charbonnier_loss(leaf, target).backward()  # zero error: eps keeps the gradient finite
    assert torch.isfinite(leaf.grad).all()


# --- adversarial ----------------------------------------------------------------


@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_finite_losses_and_grads(mode, per_pixel):
    torch.manual_seed(0)
    discriminator = tiny_discriminator(per_pixel)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    lq, real = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)

    # D step: fake from a detached G output, one backward of the sum
    fake = generator(lq)
    l_real, l_fake = discriminator_adversarial_loss(mode, discriminator(real), discriminator(fake.detach()))
    for term in (l_real, l_fake):
        assert term.dim() == 0 and term.dtype == torch.float32 and torch.isfinite(term)
    (l_real + l_fake).backward()
    assert finite_nonzero_grads(discriminator)
    assert all(p.grad is None for p in generator.parameters())

    # G step: gradients reach G through D
    discriminator.zero_grad()
    fake = generator(lq)
    g_loss = generator_adversarial_loss(mode, discriminator(fake), discriminator(real))
    assert g_loss.dim() == 0 and torch.isfinite(g_loss)
    g_loss.backward()
    assert finite_nonzero_grads(generator)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # BCE-with-logits: bce(x, 1) = softplus(-x), bce(x, 0) = softplus(x)


def test_relativistic_matches_hand_computation():
    real_values, fake_values = [1.0, -0.5, 2.0], [0.3, -1.2, 0.1]
    mean_real, mean_fake = sum(real_values) / 3, sum(fake_values) / 3
    want_g = (
        sum(softplus(r - mean_fake) for r in real_values) / 3  # bce(real - mean(fake), 0)
        + sum(softplus(-(f - mean_real)) for f in fake_values) / 3  # bce(fake - mean(real), 1)
    ) / 2
    want_d_real = 0.5 * sum(softplus(-(r - mean_fake)) for r in real_values) / 3
    want_d_fake = 0.5 * sum(softplus(f - mean_real) for f in fake_values) / 3

    real = torch.tensor(real_values).view(3, 1).requires_grad_(True)
    fake = torch.tensor(fake_values).view(3, 1).requires_grad_(True)
    g_loss = generator_adversarial_loss("relativistic", fake, real)
    assert g_loss.item() == pytest.approx(want_g, rel=1e-6)
    g_loss.backward()
    assert real.grad is None  # G's loss must not train D through the real logits
    assert fake.grad is not None

    l_real, l_fake = discriminator_adversarial_loss("relativistic", real, fake)
    assert l_real.item() == pytest.approx(want_d_real, rel=1e-6)
    assert l_fake.item() == pytest.approx(want_d_fake, rel=1e-6)
    # as BasicSR: l_d_real sees mean(fake) detached, l_d_fake sees mean(real) detached
    assert torch.autograd.grad(l_real, fake, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(l_fake, real, retain_graph=True, allow_unused=True)[0] is None


def test_other_modes_match_hand_computation():
    real, fake = torch.tensor([[2.0], [0.5]]), torch.tensor([[-1.5], [0.5]])
    pairs = {
        "vanilla": ((softplus(-2.0) + softplus(-0.5)) / 2, (softplus(-1.5) + softplus(0.5)) / 2),
        "lsgan": (((2 - 1) ** 2 + (0.5 - 1) ** 2) / 2, (1.5**2 + 0.5**2) / 2),
        "hinge": ((0.0 + 0.5) / 2, (0.0 + 1.5) / 2),
        "wgan": (-1.25, -0.5),
    }
    for mode, (want_real, want_fake) in pairs.items():
        l_real, l_fake = discriminator_adversarial_loss(mode, real, fake)
        assert (l_real.item(), l_fake.item()) == pytest.approx((want_real, want_fake), rel=1e-6), mode
    want_g = {
        "vanilla": (softplus(1.5) + softplus(-0.5)) / 2,
        "lsgan": (2.5**2 + 0.5**2) / 2,
        "hinge": 0.5,
        "wgan": 0.5,
    }
    for mode, want in want_g.items():
        assert generator_adversarial_loss(mode, fake).item() == pytest.approx(want, rel=1e-6), mode


def test_unknown_mode_and_missing_real_logits():
    logits = torch.zeros(2, 1)
    assert set(ADVERSARIAL_MODES) == set(MODES)
    with pytest.raises(ValueError, match="relativistic"):
        generator_adversarial_loss("softplus", logits)
    with pytest.raises(ValueError, match="hinge"):
        discriminator_adversarial_loss("nope", logits, logits)
    with pytest.raises(ValueError, match="real_logits"):
        generator_adversarial_loss("relativistic", logits)


# --- gradient penalty and R1 ------------------------------------------------------


def unit_weight(scale: float = 1.0) -> torch.Tensor:
    weight = torch.randn(3, 8, 8)
    return weight / weight.norm() * scale


def test_gradient_penalty_known_values():
    torch.manual_seed(0)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert gradient_penalty(LinearCritic(unit_weight()), real, fake).item() < 1e-10
    assert gradient_penalty(LinearCritic(unit_weight(3.0)), real, fake).item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_gradient_penalty_backpropagates_into_d(per_pixel):
    torch.manual_seed(0)
    discriminator = tiny_discriminator(per_pixel)
    real = torch.rand(4, 3, 8, 8)
    fake = torch.rand(4, 3, 8, 8, requires_grad=True)
    penalty = gradient_penalty(discriminator, real, fake)
    assert penalty.dim() == 0 and penalty.item() > 0
    penalty.backward()  # through the create_graph gradient
    assert finite_nonzero_grads(discriminator)
    assert fake.grad is None  # the interpolates are built from detached images


def test_r1_known_value_and_backprop():
    torch.manual_seed(0)
    real = torch.rand(4, 3, 8, 8).requires_grad_(True)
    critic = LinearCritic(unit_weight(2.0))
    assert r1_penalty(critic(real), real).item() == pytest.approx(4.0, rel=1e-5)  # ||w||^2

    discriminator = tiny_discriminator(per_pixel=True)
    penalty = r1_penalty(discriminator(real), real)
    assert penalty.item() > 0
    penalty.backward()
    assert finite_nonzero_grads(discriminator)
    with pytest.raises(ValueError, match="requires_grad"):
        images = torch.rand(2, 3, 8, 8)
        r1_penalty(discriminator(images), images)


def test_penalties_under_bf16_autocast():
    torch.manual_seed(0)
    discriminator = tiny_discriminator(per_pixel=True)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    torch.manual_seed(1)
    gp_fp32 = gradient_penalty(discriminator, real, fake)
    real_leaf = real.clone().requires_grad_(True)
    r1_fp32 = r1_penalty(discriminator(real_leaf), real_leaf)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp_bf16 = gradient_penalty(discriminator, real, fake)
        real_leaf = real.clone().requires_grad_(True)
        logits = discriminator(real_leaf)
        assert logits.dtype == torch.bfloat16  # the forward really ran in bf16
        r1_bf16 = r1_penalty(logits, real_leaf)
    for fp32, bf16 in ((gp_fp32, gp_bf16), (r1_fp32, r1_bf16)):
        assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
        assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)
    (gp_bf16 + r1_bf16).backward()
    assert finite_nonzero_grads(discriminator)


# --- DDP: one backward of the total D loss gives the averaged single-process gradients


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _d_total_loss(discriminator, rank: int) -> torch.Tensor:
    """The D loss with both penalties, on data (and interpolation weights) seeded by rank."""
    torch.manual_seed(100 + rank)
    real = torch.rand(2, 3, 8, 8).requires_grad_(True)  # for R1
    fake = torch.rand(2, 3, 8, 8)
    real_logits = discriminator(real)
    l_real, l_fake = discriminator_adversarial_loss("wgan", real_logits, discriminator(fake))
    return l_real + l_fake + 10.0 * gradient_penalty(discriminator, real, fake) + r1_penalty(real_logits, real)


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        discriminator = tiny_discriminator(per_pixel=True)
        reference = tiny_discriminator(per_pixel=True)
        reference.load_state_dict(discriminator.state_dict())
        ddp = DistributedDataParallel(discriminator)
        _d_total_loss(ddp, rank).backward()  # the only backward; autograd.grad ran inside the penalties
        for r in range(world_size):
            _d_total_loss(reference, r).backward()
        for p_ddp, p_ref in zip(discriminator.parameters(), reference.parameters()):
            torch.testing.assert_close(p_ddp.grad, p_ref.grad / world_size, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_penalties_correct_under_ddp():
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)  # raises if a rank's assert fails
