"""The Real-ESRGAN recipes and the blind demo run a few steps with tiny models, and blind validation is
reproducible."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gan_core.config import load_config
from gan_core.loop import Hooks, device_batches, fit, make_blind, make_sampler, setup_state, validator
from gan_core.losses.perceptual import vgg19_features
from gan_core.scoring import BlindValidationPairs, evaluate_images, mean_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
TINY = ["generator.num_feat=8", "generator.num_block=1", "generator.num_grow_ch=4", "discriminator.num_feat=8",
        "data.patch_size=32", "data.batch_size=2", "data.blind.pool_size=4", "train.log_every=1",
        "train.val_every=1000", "train.ckpt_every=1000", "train.bf16=false", "train.channels_last=false"]


def test_realesrgan_recipes_carry_the_published_hyperparameters():
    net = load_config(CONFIGS / "realesrnet_x4plus.yaml")
    gan = load_config(CONFIGS / "realesrgan_x4plus.yaml")
    assert (net.optim.g_lr, net.data.patch_size, net.data.batch_size, net.train.total_steps) == (2e-4, 256, 12, 1_000_000)
    assert not net.gan_enabled and net.data.blind.pool_size == 180 and net.train.ema_decay == 0.999
    assert (gan.optim.g_lr, gan.optim.d_lr, gan.train.total_steps, gan.train.pretrain_steps) == (1e-4, 1e-4, 400_000, 0)
    assert gan.loss.perceptual == "vgg" and gan.loss.perceptual_layers == {
        "conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
    assert (gan.loss.pixel_weight, gan.loss.adversarial, gan.loss.adversarial_weight) == (1.0, "vanilla", 0.1)
    assert gan.discriminator.name == "unet" and gan.data.blind.pool_size == 180


@pytest.mark.parametrize("name", ["realesrnet_x4plus", "realesrgan_x4plus", "blind_demo"])
def test_recipe_runs_a_few_tiny_steps(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    state_dict = {f"features.{k}": v for k, v in vgg19_features().state_dict().items()}  # random: tests only
    torch.save(state_dict, tmp_path / "vgg19-dcbbabf1.pth")
    cfg = load_config(CONFIGS / f"{name}.yaml", [*TINY, "train.total_steps=4", "train.pretrain_steps=2",
                                                  "train.d_warmup_steps=1", f"loss.perceptual_weights_path={tmp_path}"])
    if name == "realesrnet_x4plus":
        cfg = cfg.with_values({"train.pretrain_steps": 4})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    device = torch.device("cpu")
    state = setup_state(cfg, device)
    logged = {}
    metrics = fit(state, device_batches(make_sampler(cfg, images), device, cfg, make_blind(cfg)), cfg,
                  Hooks(validate=validator(state, images[:1], cfg, device), log=lambda m, step: logged.update(m)))
    assert metrics["step"] == 4 and np.isfinite(metrics["val/psnr_y"]) and "val/hf_ratio" in metrics
    if cfg.gan_enabled:
        assert {"d/real_logit", "d/fake_logit", "g/adv"} <= set(logged)
    if cfg.loss.perceptual == "vgg":
        assert "g/percep" in logged


def test_blind_validation_pairs_are_reproducible_and_degraded():
    cfg = load_config(CONFIGS / "blind_demo.yaml")
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pairs = BlindValidationPairs(cfg.data.blind, seed=0)
    lq, gt = pairs(hr, 4)
    assert lq.shape == (1, 3, 16, 16) and gt.shape == (1, 3, 64, 64)
    assert torch.equal(pairs(hr, 4)[0], lq)  # the same image gets the same degradation, in any order
    pairs(other, 4)
    assert torch.equal(pairs(hr, 4)[0], lq)
    assert not torch.equal(BlindValidationPairs(cfg.data.blind, seed=1)(hr, 4)[0], lq)

    class Bicubic(torch.nn.Module):
        scale = 4

        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic")

    means = mean_metrics(evaluate_images(Bicubic(), [hr], 4, torch.device("cpu"), make_pair=pairs))
    assert np.isfinite(means["psnr_y"]) and means["bicubic_hf_ratio"] < 1.0
