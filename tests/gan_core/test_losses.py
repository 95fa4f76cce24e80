"""Pixel, adversarial and perceptual losses, gradient penalty and R1."""

import math
import socket

import pytest
import torch
import torchvision
from torch import nn

from gan_core.losses import (
    ADVERSARIAL_MODES,
    LPIPS,
    VGGFeatureLoss,
    charbonnier_loss,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    gradient_penalty,
    l1_loss,
    r1_penalty,
)
from gan_core.losses.perceptual import vgg19_features
from gan_core.weights import MissingWeightsError

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


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty torch hub cache and no $GAN_CORE_WEIGHTS_DIR: nothing real is found or touched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GAN_CORE_WEIGHTS_DIR", raising=False)
    return tmp_path


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


# --- perceptual ---------------------------------------------------------------------


def test_lpips_random_backbone():
    model = LPIPS(net="alex", random_backbone=True)
    assert model.metric_name == "lpips_random"
    assert all(not p.requires_grad for p in model.parameters())
    model.train()  # a parent's .train() must not enable lpips' dropout
    assert not model.training and not model.model.training
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    d = model(x, y)
    assert d.shape == (2,)
    assert (d > 0).all() and torch.equal(d, model(x, y))  # deterministic
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-6)
    d.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def _lpips_slice_of(model: LPIPS) -> dict[int, nn.Module]:
    return {int(name): layer for s in model.model.net.children() for name, layer in s.named_children()}


def test_lpips_loads_backbone_file(no_weights):
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    path = no_weights / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)

    model = LPIPS(net="alex", weights_path=no_weights)  # a directory holding the file
    assert model.metric_name == "lpips" and model.weights_file == path
    assert torch.equal(getattr(model.model.net.slice2, "3").weight, state["features.3.weight"])
    layers = _lpips_slice_of(model)
    backbone_keys = [k for k in state if k.startswith("features.")]
    assert len(backbone_keys) == 10
    for key in backbone_keys:
        _, index, leaf = key.split(".")
        assert torch.equal(getattr(layers[int(index)], leaf), state[key]), key
    assert all(not p.requires_grad for p in model.parameters())


def test_lpips_errors(no_weights):
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPS(net="alex")
    with pytest.raises(ValueError, match="alex"):
        LPIPS(net="squeezenet")
    wrong = no_weights / "alexnet-owt-7be5be79.pth"
    torch.save({"classifier.1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="features.0.weight"):
        LPIPS(net="alex", weights_path=wrong)


@pytest.mark.slow
def test_lpips_vgg_loads_backbone_file(no_weights):
    random_trunk = LPIPS(net="vgg", random_backbone=True).model.net
    # "sliceK.N.leaf" -> torchvision's "features.N.leaf"
    state = {"features." + name.split(".", 1)[1]: t.clone() for name, t in random_trunk.state_dict().items()}
    torch.save(state, no_weights / "vgg16-397923af.pth")
    model = LPIPS(net="vgg", weights_path=no_weights)
    assert model.metric_name == "lpips"
    assert torch.equal(getattr(model.model.net.slice3, "14").weight, state["features.14.weight"])
    assert len(model.model.net.state_dict()) == len(state) == 26


def test_vgg19_features_match_torchvision_layout():
    ours = vgg19_features()
    theirs = torchvision.models.vgg19().features
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_vgg_feature_loss(no_weights):
    loss = VGGFeatureLoss(layer="conv2_2", random_backbone=True)
    assert len(loss.features) == 8  # up to conv2_2 (index 7), before its ReLU
    assert isinstance(loss.features[-1], nn.Conv2d)
    loss.train()
    assert not loss.training and all(not p.requires_grad for p in loss.parameters())
    torch.manual_seed(0)
    pred = torch.rand(2, 3, 16, 16, requires_grad=True)
    target = torch.rand(2, 3, 16, 16, requires_grad=True)
    value = loss(pred, target)
    assert value.dim() == 0 and value.item() > 0
    assert loss(target, target).item() == 0
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert target.grad is None  # target features come from a detached target, as BasicSR

    # conv5_4 with a weights file (features only is enough; classifier keys would be ignored)
    state = {f"features.{k}": v for k, v in vgg19_features().state_dict().items()}
    torch.save(state, no_weights / "vgg19-dcbbabf1.pth")
    loaded = VGGFeatureLoss(weights_path=no_weights)
    assert len(loaded.features) == 35 and torch.equal(loaded.features[34].weight, state["features.34.weight"])


def test_vgg_feature_loss_errors(no_weights):
    with pytest.raises(MissingWeightsError, match="vgg19-dcbbabf1.pth"):
        VGGFeatureLoss()
    with pytest.raises(ValueError, match="conv5_4"):
        VGGFeatureLoss(layer="conv6_1", random_backbone=True)
    with pytest.raises(ValueError, match="l1"):
        VGGFeatureLoss(criterion="huber", random_backbone=True)


REAL_ESRGAN_LAYERS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


def test_vgg_feature_loss_layers_match_a_torchvision_reference(no_weights):
    """Real-ESRGAN's weighted layers, checked against features taken by hand from torchvision's vgg19 with the
    same (random) weights: ImageNet normalisation, outputs before each ReLU, mean L1 per layer, weighted sum."""
    torch.manual_seed(0)
    loss = VGGFeatureLoss(layers=REAL_ESRGAN_LAYERS, random_backbone=True)
    assert len(loss.features) == 35 and loss.layer == "conv5_4"
    reference = torchvision.models.vgg19().features.eval()
    reference.load_state_dict(loss.features.state_dict())
    indices = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}

    def features(images):
        x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        taken = {}
        for index, module in enumerate(reference):
            x = module(x)
            if index in indices.values():
                taken[index] = x.clone()  # torchvision's ReLUs are in-place
        return {name: taken[index] for name, index in indices.items()}

    pred, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours_pred, ref_pred, ref_target = loss.extract_all(pred), features(pred), features(target)
        want = sum(weight * (ref_pred[name] - ref_target[name]).abs().mean()
                   for name, weight in REAL_ESRGAN_LAYERS.items())
    for name in REAL_ESRGAN_LAYERS:
        assert torch.allclose(ours_pred[name], ref_pred[name], atol=1e-5), name
        assert (ours_pred[name] < 0).any(), f"{name} is taken before its ReLU"
    assert loss(pred, target).item() == pytest.approx(want.item(), rel=1e-5)
    # a single layer keeps today's meaning (conv5_4, weight 1)
    single = VGGFeatureLoss(random_backbone=True)
    single.features.load_state_dict(loss.features.state_dict())
    want_single = (ref_pred["conv5_4"] - ref_target["conv5_4"]).abs().mean()
    assert single(pred, target).item() == pytest.approx(want_single.item(), rel=1e-5)


def test_vgg_feature_loss_layers_errors(no_weights):
    with pytest.raises(ValueError, match=r"\['conv6_1'\].*conv5_4"):
        VGGFeatureLoss(layers={"conv1_2": 0.1, "conv6_1": 1.0}, random_backbone=True)
    with pytest.raises(ValueError, match=">= 0"):
        VGGFeatureLoss(layers={"conv1_2": -1.0}, random_backbone=True)


def test_perceptual_layers_in_the_config():
    from gan_core.config import ConfigError, config_from_dict

    cfg = config_from_dict({"loss": {"perceptual": "vgg", "perceptual_layers": REAL_ESRGAN_LAYERS}})
    assert cfg.loss.perceptual_layers == REAL_ESRGAN_LAYERS
    assert config_from_dict({"loss": {"perceptual": "vgg"}}).loss.perceptual_layers is None  # conv5_4 alone
    with pytest.raises(ConfigError, match=r"unknown VGG19 layer\(s\) \['conv5_5'\]; valid: conv1_1"):
        config_from_dict({"loss": {"perceptual": "vgg", "perceptual_layers": {"conv5_5": 1.0}}})
    with pytest.raises(ConfigError, match="needs perceptual: vgg"):
        config_from_dict({"loss": {"perceptual": "lpips", "perceptual_layers": {"conv5_4": 1.0}}})
    with pytest.raises(ConfigError, match="at least one layer"):
        config_from_dict({"loss": {"perceptual": "vgg", "perceptual_layers": {}}})


def test_build_perceptual_uses_the_configured_layers(no_weights):
    from gan_core.build import build_perceptual
    from gan_core.config import config_from_dict

    state = {f"features.{k}": v for k, v in vgg19_features(num_layers=8).state_dict().items()}
    torch.save(state, no_weights / "vgg19-dcbbabf1.pth")
    cfg = config_from_dict({"loss": {"perceptual": "vgg", "perceptual_weights_path": str(no_weights),
                                     "perceptual_layers": {"conv1_2": 0.1, "conv2_2": 0.1}}})
    module = build_perceptual(cfg, torch.device("cpu"))
    assert module.layers == {"conv1_2": 0.1, "conv2_2": 0.1} and len(module.features) == 8
