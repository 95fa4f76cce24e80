"""Perceptual losses: LPIPS and the VGG19 feature loss (BasicSR's PerceptualLoss), their weights files, the config."""

import pytest
import torch
import torchvision
from torch import nn

from gan_core.losses import LPIPS, VGGFeatureLoss
from gan_core.losses.perceptual import vgg19_features
from gan_core.weights import MissingWeightsError


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty torch hub cache and no $GAN_CORE_WEIGHTS_DIR: nothing real is found or touched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GAN_CORE_WEIGHTS_DIR", raising=False)
    return tmp_path


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
