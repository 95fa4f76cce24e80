"""Real-ESRGAN's second-order degradation: shapes and range, seeding per rank, exact resume, the pair pool, the
config's bad-input errors, and a blind `fit` interrupted at a checkpoint and resumed."""

import shutil

import pytest
import torch

from gan_core.config import BlindDegradationSection, ConfigError, config_from_dict
from gan_core.data.realesrgan import BlindPairs, PairPool, SecondOrderDegradation, filter2d
from gan_core.loop import Hooks, checkpointer, device_batches, fit, make_blind, make_sampler, restore, setup_state
from tests.gan_core.conftest import random_rgb, tiny_config

CPU = torch.device("cpu")


def _gt_batches(count, batch=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        coarse = torch.rand(batch, 3, size // 4, size // 4, generator=generator)
        yield torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _degradation(seed=0, rank=0, **changes):
    section = BlindDegradationSection(**changes)
    return SecondOrderDegradation(scale=4, seed=seed, rank=rank, **section.degradation_kwargs())


def test_lq_shape_dtype_range_and_levels():
    degradation = _degradation()
    for gt in _gt_batches(6, size=48):
        lq = degradation(gt)
        assert lq.shape == (4, 3, 12, 12) and lq.dtype == torch.float32
        assert 0 <= lq.min() and lq.max() <= 1
        torch.testing.assert_close(lq * 255, (lq * 255).round(), rtol=0, atol=1e-4)  # 8-bit levels
    assert degradation.calls == 6


def test_same_seed_and_rank_draw_the_same_degradations_other_ranks_differ():
    gts = list(_gt_batches(3))
    first, again, other_rank, other_seed = _degradation(), _degradation(), _degradation(rank=1), _degradation(seed=1)
    for gt in gts:
        lq = first(gt)
        assert torch.equal(lq, again(gt))
        assert not torch.equal(lq, other_rank(gt))
        assert not torch.equal(lq, other_seed(gt))


def test_resume_draws_the_same_degradations_and_pool_pairs():
    gts = list(_gt_batches(8))
    whole = BlindPairs(_degradation(), PairPool(8, 4, seed=0))
    outputs, saved = [], None
    for step, gt in enumerate(gts):
        if step == 4:
            saved = whole.state_dict()
        outputs.append(whole(gt))
    saved = torch.load(_roundtrip(saved), weights_only=True)  # as a checkpoint stores it
    resumed = BlindPairs(_degradation(), PairPool(8, 4, seed=0))
    resumed.load_state_dict(saved)
    for gt, (lq, gt_out) in zip(gts[4:], outputs[4:]):
        got_lq, got_gt = resumed(gt)
        assert torch.equal(got_lq, lq) and torch.equal(got_gt, gt_out)


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_pool_passes_batches_while_filling_then_mixes_them():
    pool = PairPool(8, 2, seed=0)
    batches = [(torch.full((2, 1, 1, 1), float(i)), torch.full((2, 1, 2, 2), float(i))) for i in range(10)]
    for i in range(4):  # filling: each batch comes back as it is
        lq, gt = pool(*batches[i])
        assert torch.equal(lq, batches[i][0])
    seen = set()
    for i in range(4, 10):
        lq, gt = pool(*batches[i])
        assert lq.shape == (2, 1, 1, 1) and gt.shape == (2, 1, 2, 2)
        assert torch.equal(lq.flatten(), gt[:, 0, 0, 0])  # pairs stay pairs
        seen.update(lq.flatten().tolist())
    assert seen - {4.0, 5.0, 6.0, 7.0, 8.0, 9.0}  # earlier batches come out later
    pool_values = sorted(pool.lq.flatten().tolist())
    assert len(pool_values) == 8
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PairPool(9, 2, seed=0)
    with pytest.raises(ValueError, match="expected batches of 2"):
        pool(torch.zeros(3, 1, 1, 1), torch.zeros(3, 1, 2, 2))


def test_filter2d_with_pulse_is_identity_and_tiny_images_work():
    img = torch.rand(2, 3, 5, 6)
    pulse = torch.zeros(2, 21, 21)
    pulse[:, 10, 10] = 1
    assert torch.equal(filter2d(img, pulse), img)  # 5 px < radius 10: replicate padding
    lq = _degradation()(torch.rand(2, 3, 16, 16))
    assert lq.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("blind, message", [
    ({"first": {"noise_range": [30, 1]}}, r"data\.blind\.first\.noise_range: empty range"),
    ({"second": {"jpeg_range": [0, 95]}}, r"data\.blind\.second\.jpeg_range: out of bounds"),
    ({"first": {"resize_range": [0.0, 1.5]}}, r"data\.blind\.first\.resize_range: out of bounds"),
    ({"first": {"blur_sigma": [-1, 2]}}, r"data\.blind\.first\.blur_sigma: out of bounds"),
    ({"first": {"sinc_prob": 1.5}}, r"data\.blind\.first\.sinc_prob: "),
    ({"first": {"kernel_sizes": [7, 8]}}, r"data\.blind\.first\.kernel_sizes: kernel sizes must be odd"),
    ({"final_kernel_sizes": [1]}, r"data\.blind\.final_kernel_sizes: kernel sizes must be odd"),
    ({"first": {"kernel_probs": {"iso": 0.5}}}, r"data\.blind\.first\.kernel_probs: .*sum to 1"),
    ({"second": {"resize_probs": [0.5, 0.5, 0.5]}}, r"data\.blind\.second\.resize_probs: .*sum to 1"),
    ({"pool_size": 6}, r"data\.blind\.pool_size \(6\) must be a multiple of data\.batch_size \(4\)"),
    ({"first": {"noise_rang": [1, 2]}}, r"data\.blind\.first\.noise_rang: unknown key"),
])
def test_bad_blind_settings_name_the_key(blind, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"batch_size": 4, "blind": blind}})


def test_blind_excludes_the_first_order_degradation_and_defaults_are_real_esrgans():
    with pytest.raises(ConfigError, match="data.degradation and data.blind exclude each other"):
        config_from_dict({"data": {"batch_size": 4, "blind": {}, "degradation": {"blur_sigma": [0, 1]}}})
    cfg = config_from_dict({"data": {"batch_size": 12, "blind": {}}})
    blind = cfg.data.blind
    assert (blind.pool_size, blind.final_sinc_prob, blind.first.resize_range, blind.second.blur_prob) == (
        180, 0.8, (0.15, 1.5), 0.8)
    assert config_from_dict({}).data.blind is None


# -- the training loop in blind mode -----------------------------------------------------------------


def _blind_config():
    return tiny_config(train={"total_steps": 6, "pretrain_steps": 2, "log_every": 2, "val_every": 3, "ckpt_every": 3},
                       data={"patch_size": 32, "batch_size": 2, "blind": {"pool_size": 4}})


def _images():
    return [random_rgb(48, 56, seed=i) for i in range(3)]


def _run(cfg, keep, resume_from=None):
    state = setup_state(cfg, CPU)
    sampler_state = restore(state, resume_from, cfg)[1] if resume_from else None
    sampler = make_sampler(cfg, _images(), sampler_state=sampler_state)
    blind = make_blind(cfg, sampler_state=sampler_state)
    logs, drawn = [], []

    def copy(metrics, directory):
        if directory is not None:
            shutil.copytree(directory, keep / f"step{metrics['step']}")

    def recorded(batches):
        for lq, gt in batches:
            drawn.append((lq.clone(), gt.clone()))
            yield lq, gt

    hooks = Hooks(checkpoint=checkpointer(state, cfg, sampler, blind=blind), report=copy,
                  log=lambda means, step: logs.append((step, {k: v for k, v in means.items() if "perf" not in k})))
    fit(state, recorded(device_batches(sampler, CPU, cfg, blind)), cfg, hooks)
    return logs, drawn


def test_sampler_yields_gt_only_in_blind_mode():
    cfg = _blind_config()
    lq, gt = next(make_sampler(cfg, _images()))
    assert lq is None and gt.shape == (2, 3, 32, 32)


def test_blind_fit_resumed_at_a_checkpoint_draws_what_the_whole_run_drew(tmp_path):
    cfg = _blind_config()
    whole_logs, whole_drawn = _run(cfg, tmp_path / "whole")
    assert whole_drawn[0][0].shape == (2, 3, 8, 8)
    resumed_logs, resumed_drawn = _run(cfg, tmp_path / "resumed", resume_from=tmp_path / "whole" / "step3")
    # Steps 4-6 draw the same pairs (degradation and pool restored) and log the same losses.
    assert len(resumed_drawn) == 3 and len(whole_drawn) == 6
    for (lq, gt), (want_lq, want_gt) in zip(resumed_drawn, whole_drawn[3:]):
        assert torch.equal(lq, want_lq) and torch.equal(gt, want_gt)
    assert resumed_logs[-1] == whole_logs[-1] and resumed_logs[-1][0] == 6
    saved = torch.load(tmp_path / "whole" / "step3" / "sampler_rank0.pt", weights_only=True)
    assert saved["blind"]["pool"]["filled"] == 4 and saved["blind"]["degradation"]["calls"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_lq_stays_there_and_a_resume_is_exact():
    device = torch.device("cuda")
    gts = [gt.to(device) for gt in _gt_batches(6, size=64)]
    whole = BlindPairs(_degradation(), PairPool(8, 4, seed=0))
    outputs = []
    for step, gt in enumerate(gts):
        if step == 3:
            saved = torch.load(_roundtrip(whole.state_dict()), weights_only=True)
        outputs.append(whole(gt))
    assert outputs[0][0].device.type == "cuda" and outputs[0][0].shape == (4, 3, 16, 16)
    resumed = BlindPairs(_degradation(), PairPool(8, 4, seed=0))
    resumed.load_state_dict(saved)
    for gt, (lq, gt_out) in zip(gts[3:], outputs[3:]):
        got_lq, got_gt = resumed(gt)
        assert torch.equal(got_lq, lq) and torch.equal(got_gt, gt_out)


def test_device_batches_make_the_lr_then_apply_channels_last():
    cfg = tiny_config(data={"patch_size": 32, "batch_size": 2, "blind": {"pool_size": 0}},
                      train={"channels_last": True})
    blind = make_blind(cfg)
    assert blind.pool is None
    lq, gt = next(device_batches(make_sampler(cfg, _images()), CPU, cfg, blind))
    assert lq.shape == (2, 3, 8, 8) and gt.shape == (2, 3, 32, 32)
    assert lq.is_contiguous(memory_format=torch.channels_last) and gt.is_contiguous(memory_format=torch.channels_last)
