import copy
import math

import pytest
import torch

from gan_core.build import build_state
from gan_core.loop import wrap_models
from gan_core.losses.perceptual import VGGFeatureLoss
from gan_core.step import ema_update, g_step, phase, train_step, unwrap
from tests.gan_core.conftest import batches, tiny_config

MODES = ["vanilla", "relativistic", "lsgan", "hinge", "wgan"]


def _run(cfg, steps, seed=0):
    torch.manual_seed(seed)
    state = build_state(cfg, torch.device("cpu"))
    data = batches(cfg, seed)
    history = [train_step(state, data, cfg) for _ in range(steps)]
    return state, history


@pytest.mark.parametrize("mode", MODES)
def test_every_adversarial_mode_trains_with_finite_losses(mode):
    cfg = tiny_config(loss={"adversarial": mode, "adversarial_weight": 0.1})
    state, history = _run(cfg, 2)
    for losses in history:
        assert {"g/pix", "g/adv", "d/real", "d/fake"} <= set(losses)
        assert all(math.isfinite(float(v)) for v in losses.values()), losses
    grads = [p.grad for p in state.discriminator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("penalty", ["gp_weight", "r1_weight"])
def test_penalties_are_finite_and_reported(penalty):
    cfg = tiny_config(loss={"adversarial": "wgan", penalty: 10.0})
    _, history = _run(cfg, 2)
    key = "d/gp" if penalty == "gp_weight" else "d/r1"
    assert all(math.isfinite(float(h[key])) and float(h[key]) >= 0 for h in history)


def test_phases_pretrain_warmup_gan():
    cfg = tiny_config(train={"total_steps": 6, "pretrain_steps": 2, "d_warmup_steps": 2})
    assert [phase(s, cfg) for s in range(6)] == ["pretrain"] * 2 + ["d_warmup"] * 2 + ["gan"] * 2
    state, history = _run(cfg, 6)
    assert "d/real" not in history[0] and "g/adv" not in history[0]
    assert "g/pix" not in history[2] and "d/real" in history[2]
    assert "g/adv" in history[5] and state.step == 6


def test_pixel_only_run_builds_no_discriminator():
    cfg = tiny_config(train={"total_steps": 12, "pretrain_steps": 12})
    state, history = _run(cfg, 12)
    assert state.discriminator is None and state.d_optimizer is None
    assert {"g/pix", "g/total", "lr/g"} == set(history[-1])
    # Learning, not merely finite: the L1 loss of the last steps is well below that of the first ones.
    first, last = (sum(float(h["g/pix"]) for h in part) / 3 for part in (history[:3], history[-3:]))
    assert last < 0.8 * first, (first, last)


def test_d_steps_per_g():
    cfg = tiny_config(train={"d_steps_per_g": 3})
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    train_step(state, batches(cfg), cfg)
    assert state.d_optimizer.state[next(iter(state.discriminator.parameters()))]["step"] == 3


def test_ema_is_foreach_lerp():
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    expected = [0.9 * e.detach() + 0.1 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    ema_update(ema, model, 0.9)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got, want)


def test_golden_losses():
    # Recorded on torch 2.14.1 CPU; a change here means the step's maths changed.
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1})
    _, history = _run(cfg, 4)
    got = [[round(float(h[k]), 5) for k in ("g/pix", "g/adv", "d/real", "d/fake")] for h in history]
    assert sum(got, []) == pytest.approx(sum(GOLDEN, []), abs=2e-4)


# (g/pix, g/adv, d/real, d/fake) for 4 steps, recorded with torch 2.14.1 on the CPU.
GOLDEN = [
    [0.49366, 0.06932, 0.34654, 0.34654],
    [0.45715, 0.06944, 0.34572, 0.34572],
    [0.44556, 0.07138, 0.33625, 0.33625],
    [0.49229, 0.0801, 0.29841, 0.29841],
]


def test_ema_warms_up_then_holds_decay():
    from gan_core.step import ema_decay_at

    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(100000, 0.999) == 0.999


def _losses(cfg, steps, *, compiled=False):
    """Each step's losses, from the same initial weights and batches; G and D compiled by wrap_models."""
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    if compiled:
        wrap_models(state, cfg.with_values({"train.compile": True}))
    data = batches(cfg)
    return [{k: float(v) for k, v in train_step(state, data, cfg).items()} for _ in range(steps)]


@pytest.mark.slow
def test_compiled_step_gives_the_eager_losses():
    # torch.compile with inductor (C++ kernels on the CPU, about 45 s to compile here). D's requires_grad is
    # never toggled, which is what lets torch.compile trace both networks; the losses agree with eager.
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1})
    eager, compiled = _losses(cfg, 4), _losses(cfg, 4, compiled=True)
    for want, got in zip(eager, compiled):
        assert got.keys() == want.keys()
        # inductor fuses and reorders float32 arithmetic: the losses equal to rounding; the mean logits, near 0
        # and the most sensitive readout of D, to a few thousandths by the 4th step
        losses = [k for k in want if not k.endswith("_logit")]
        assert [got[k] for k in losses] == pytest.approx([want[k] for k in losses], rel=1e-3, abs=1e-5)
        assert [got[k] for k in want] == pytest.approx([want[k] for k in want], abs=5e-3)
    assert compiled[-1]["d/real"] != compiled[0]["d/real"]


def test_fused_adam_gives_the_foreach_losses():
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1})
    foreach, fused = _losses(cfg, 4), _losses(cfg.with_values({"optim.fused": True}), 4)
    for want, got in zip(foreach, fused):
        # the fused kernel orders its arithmetic differently: equal to float32 rounding, amplified over 4 steps
        assert [got[k] for k in want] == pytest.approx([want[k] for k in want], rel=1e-3, abs=1e-6)


def test_bf16_step_tracks_float32():
    # bf16 autocast (G, D and the VGG feature network) against float32 over 40 steps from the same start:
    # each loss's mean over the run within 3 %, the pixel loss falling in both.
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1}, train={"total_steps": 40})
    runs = []
    for bf16 in (False, True):
        run_cfg = cfg.with_values({"train.bf16": bf16, "loss.perceptual": "vgg"})
        torch.manual_seed(0)
        state = build_state(cfg, torch.device("cpu"))  # built without VGG weights; a random VGG19 below
        state.perceptual = VGGFeatureLoss(random_backbone=True)
        runs.append([{k: float(v) for k, v in train_step(state, batches(run_cfg), run_cfg).items()}
                     for _ in range(40)])
    fp32, bf16 = runs
    keys = ("g/pix", "g/percep", "g/adv", "d/real", "d/fake")
    for step in range(3):  # before the GAN's feedback amplifies rounding: bf16's own error, under 1 %
        assert [bf16[step][k] for k in keys] == pytest.approx([fp32[step][k] for k in keys], rel=0.01), step
    for key in keys:  # over the run: the same balance of G and D, within 10 %
        mean32, mean16 = (sum(h[key] for h in run) / len(run) for run in runs)
        assert mean16 == pytest.approx(mean32, rel=0.10), key
    for run in runs:
        assert sum(h["g/pix"] for h in run[-10:]) < 0.8 * sum(h["g/pix"] for h in run[:10])


def test_g_step_computes_no_discriminator_weight_gradients():
    # G's backward names G's parameters as its inputs: D is differentiated through, never into.
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1})
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    g_step(state.generator, state.g_optimizer, next(batches(cfg)), cfg, discriminator=state.discriminator)
    assert all(p.grad is None for p in state.discriminator.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in state.generator.parameters())


def _g_step_grads(generator, discriminator, cfg, rank: int):
    lq, gt = next(batches(cfg, seed=rank))
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
    g_step(generator, optimizer, (lq, gt), cfg, discriminator=discriminator)
    return [p.grad.clone() for p in unwrap(generator).parameters()]


def _ddp_g_step_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1})
        torch.manual_seed(0)
        state = build_state(cfg, torch.device("cpu"))
        reference = copy.deepcopy(state.generator)
        ddp_g = DistributedDataParallel(state.generator)
        ddp_d = DistributedDataParallel(state.discriminator, broadcast_buffers=False)
        synced = _g_step_grads(ddp_g, ddp_d, cfg, rank)
        per_rank = [_g_step_grads(copy.deepcopy(reference), state.discriminator, cfg, r) for r in range(world_size)]
        for got, *each in zip(synced, *per_rank):
            torch.testing.assert_close(got, sum(each) / world_size, rtol=1e-4, atol=1e-6)
        assert all(p.grad is None for p in state.discriminator.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_g_step_gradients_are_averaged_under_ddp():
    # backward(inputs=G's parameters) still fires DDP's gradient hooks: G's grads are the mean over ranks.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_g_step_worker, args=(2, port), nprocs=2, join=True)  # raises if a rank's assert fails
