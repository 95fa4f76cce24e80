"""gan_core.tasks: each task's training and validation pairs, its metrics and baseline, its content loss, and a
short training run of each through the loop (in one process)."""

import numpy as np
import pytest
import torch

from gan_core.config import ConfigError
from gan_core.data.pairs import random_gt_patch
from gan_core.loop import fit, make_sampler, setup_state, validator
from gan_core.losses.fusion import fusion_content_loss, laplacian, max_content_loss, sobel_magnitude
from gan_core.scoring import evaluate_images, mean_metrics, sample_grid
from gan_core.tasks import build_task, luma
from tests.gan_core.conftest import tiny_config

CPU = torch.device("cpu")
TASK_GENERATORS = {"denoise": {"num_in_ch": 3, "num_out_ch": 3}, "lowlight": {"num_in_ch": 3, "num_out_ch": 3},
                   "fusion": {"num_in_ch": 2, "num_out_ch": 1}}


def task_config(name, **task):
    return tiny_config(task={"name": name, **task},
                       generator={"scale": 1, **TASK_GENERATORS[name], **({"num_in_ch": 1, "num_out_ch": 1} if task.get("gray") else {})},
                       train={"total_steps": 4, "pretrain_steps": 1, "val_every": 2, "ckpt_every": 4, "log_every": 2})


def smooth_rgb(height, width, seed=0):
    """A seeded smooth uint8 (H, W, 3) image (noise on it is easy to tell from the content)."""
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def ir_vi_pair(height, width, seed=0):
    """A (H, W, 6) fusion example: a gray 'IR' image repeated to 3 channels, then a visible RGB image."""
    ir = smooth_rgb(height, width, seed)[..., :1].repeat(3, axis=2)
    return np.concatenate([ir, smooth_rgb(height, width, seed + 100)], axis=2)


def test_configs_check_channels_scale_and_metric():
    with pytest.raises(ConfigError, match="generator.scale: 1"):
        tiny_config(task={"name": "denoise"})
    with pytest.raises(ConfigError, match="num_in_ch: 2 and generator.num_out_ch: 1"):
        tiny_config(task={"name": "fusion"}, generator={"scale": 1})
    with pytest.raises(ConfigError, match="loss.perceptual needs RGB"):
        task_config("fusion").with_values({"loss.perceptual": "lpips"})
    with pytest.raises(ConfigError, match="not reported by task fusion"):
        task_config("fusion").with_values({"run.checkpoint_metric": "val/psnr_y"})
    with pytest.raises(ConfigError, match="noise_sigma"):
        task_config("denoise", noise_sigma=[30, 10])
    assert task_config("fusion").run.checkpoint_metric == "val/qabf"  # the task's default
    assert task_config("denoise").run.checkpoint_metric == "val/psnr_y"


def test_denoise_noise_levels_follow_the_config():
    cfg = task_config("denoise", noise_sigma=[50, 50])
    clean = torch.full((4, 3, 32, 32), 0.5)
    lq, gt = build_task(cfg).train_pair(clean, torch.Generator().manual_seed(0))
    assert torch.equal(gt, clean)
    assert (lq - clean).std().item() == pytest.approx(50 / 255, rel=0.05)
    gray_noise = build_task(task_config("denoise", noise_sigma=[25, 25], gray_noise_prob=1.0))
    lq, _ = gray_noise.train_pair(clean, torch.Generator().manual_seed(0))
    assert torch.equal(lq[:, 0], lq[:, 1]) and torch.equal(lq[:, 1], lq[:, 2])  # one noise for all channels
    poisson = build_task(task_config("denoise", noise="poisson", poisson_scale=[1, 1]))
    lq, _ = poisson.train_pair(clean, torch.Generator().manual_seed(0))
    # Shot noise of Poisson(255 * 0.5) counts: std sqrt(127.5) / 255.
    assert (lq - clean).std().item() == pytest.approx(127.5**0.5 / 255, rel=0.05)


def test_gray_denoise_works_on_luma():
    cfg = task_config("denoise", gray=True)
    assert (cfg.generator.num_in_ch, cfg.generator.num_out_ch) == (1, 1)
    lq, gt = build_task(cfg).val_pair(smooth_rgb(36, 44))
    assert lq.shape == gt.shape == (1, 1, 36, 44)  # mod-cropped to 4 for the x1 RRDB


def test_lowlight_darkens_within_the_ranges():
    cfg = task_config("lowlight", dark_gamma=[2, 2], dark_scale=[0.5, 0.5], dark_noise_sigma=[0, 0])
    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    lq, _ = build_task(cfg).train_pair(clean, None)
    assert torch.allclose(lq, 0.5 * clean**2)


def test_paired_examples_are_split_and_cropped_together():
    pair = np.concatenate([np.zeros((40, 40, 3), np.uint8), np.full((40, 40, 3), 200, np.uint8)], axis=2)
    pair[5:9, 5:9, :3] = 255  # a mark in the input only: its place must match the target's crop
    pair[5:9, 5:9, 3:] = 17
    patch = random_gt_patch(torch.from_numpy(pair.transpose(2, 0, 1).copy()), patch_size=16, scale=1,
                            generator=torch.Generator().manual_seed(3))
    lq, gt = build_task(task_config("lowlight")).train_pair(patch[None], None)
    assert torch.equal(lq == 1.0, gt == 17 / 255)


def test_fusion_pairs_metrics_and_loss():
    task = build_task(task_config("fusion"))
    example = ir_vi_pair(40, 48)
    lq, gt = task.val_pair(example)
    assert lq.shape == (1, 2, 40, 48) and gt.shape == (1, 1, 40, 48)
    assert torch.equal(lq[:, 1:2], gt)  # the visible luma is both an input and D's real image
    assert torch.allclose(gt, luma(torch.from_numpy(example[..., 3:].transpose(2, 0, 1)).float()[None] / 255))
    sums = task.score(lq[:, :1], lq, gt)  # the IR image itself as the "fused" output
    assert set(sums) == {"en", "sd", "sf", "mi", "qabf", "average_en", "average_sd", "average_sf", "average_mi",
                         "average_qabf"}
    with pytest.raises(ValueError, match="paired infrared and visible"):
        task.val_pair(example[..., 3:])
    ir, vi = lq[:, :1], lq[:, 1:2]
    assert fusion_content_loss(ir, ir, vi, gradient_weight=0.0).item() == 0.0
    expected = torch.mean((laplacian(ir) - laplacian(vi)) ** 2)
    assert fusion_content_loss(ir, ir, vi, gradient_weight=5.0).item() == pytest.approx(5 * expected.item())


def test_max_content_loss_by_hand():
    """SeAFusion's loss on 3 x 3 images: |grad| = |Gx| + |Gy| with replicate padding; targets are the per-pixel
    maxima of the two sources."""
    ir = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)  # one bright pixel
    vi = torch.full((1, 1, 3, 3), 0.5)  # flat: no gradient anywhere
    # Sobel of the bright centre: Gx = [[1,0,-1],[2,0,-2],[1,0,-1]] * 1 over the 3 x 3 (the kernel flipped),
    # |Gx| + |Gy| = [[2, 2, 2], [2, 0, 2], [2, 2, 2]].
    assert torch.equal(sobel_magnitude(ir)[0, 0], torch.tensor([[2.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(sobel_magnitude(vi), torch.zeros_like(vi))
    target = torch.maximum(ir, vi)  # 0.5 everywhere, 1 at the centre
    assert max_content_loss(target, ir, vi, gradient_weight=0.0).item() == 0.0
    # The flat visible image as the output: intensity |0.5 - 1| at one pixel of 9; texture |0 - 2| at 8 of 9.
    loss = max_content_loss(vi, ir, vi, intensity_weight=1.0, gradient_weight=10.0)
    assert loss.item() == pytest.approx(0.5 / 9 + 10 * 16 / 9)


class Identity(torch.nn.Module):
    scale = 1

    def forward(self, x):
        return x


def test_restoration_scores_the_input_as_baseline():
    cfg = task_config("denoise")
    means = mean_metrics(evaluate_images(Identity(), [smooth_rgb(48, 48, i) for i in range(2)], 1, CPU,
                                         task=build_task(cfg)))
    assert means["psnr_y"] == pytest.approx(means["input_psnr_y"])  # the identity is the input
    assert means["gain_psnr_y"] == pytest.approx(0.0)
    # sigma 25 on 0-255 per channel: RGB PSNR 20.2 dB; the Y channel (BT.601 weights 0.257, 0.504, 0.098 of three
    # independent noises) has std 25 * 0.574 = 14.4, PSNR-Y 25.0 dB (clipping at 0 and 255 lowers the error a little).
    assert 19.8 < means["psnr"] < 21.0
    assert 24.6 < means["input_psnr_y"] < 25.8


@pytest.mark.parametrize("name", ["denoise", "lowlight", "fusion"])
def test_each_task_trains_and_validates(name):
    cfg = task_config(name)
    examples = [ir_vi_pair(48, 48, i) for i in range(3)] if name == "fusion" else [smooth_rgb(48, 48, i) for i in range(3)]
    state = setup_state(cfg, CPU)
    sampler = make_sampler(cfg, examples)
    last = fit(state, iter(sampler), cfg)
    assert state.step == 4 and last["step"] == 4
    metrics = validator(state, examples[:2], cfg, CPU)()
    primary = "val/qabf" if name == "fusion" else "val/psnr_y"
    assert np.isfinite(metrics[primary]) and (f"val/gain_{primary[4:]}" in metrics)
    grid = sample_grid(state.generator, examples[0], 1, CPU, task=build_task(cfg))
    assert grid.shape == (48, 144, 3) and grid.dtype == np.uint8
