import os

import pytest
import torch

from gan_core.build import build_state
from gan_core.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_config,
    export_generator,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from gan_core.models import load_generator
from gan_core.step import train_step
from tests.gan_core.conftest import batches, tiny_config


def _losses(history):
    return [{k: float(v) for k, v in h.items()} for h in history]


def test_round_trip_restores_identical_training(tmp_path):
    cfg = tiny_config(loss={"adversarial": "relativistic", "adversarial_weight": 0.1},
                      schedule={"lr_schedule": "cosine"}, train={"total_steps": 8, "pretrain_steps": 2})
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    data = batches(cfg)
    for _ in range(3):
        train_step(state, data, cfg)
    save_checkpoint(tmp_path, state, cfg, extra={"note": "hello"})
    # The data position is the caller's business (the sampler has its own state); replay the same batches.
    after = [next(data) for _ in range(3)]
    torch.manual_seed(123)  # the RNG state must come from the checkpoint, not from here
    expected = _losses([train_step(state, iter(after), cfg) for _ in range(3)])

    torch.manual_seed(999)
    fresh = build_state(cfg, torch.device("cpu"))
    extra = load_checkpoint(tmp_path, fresh)
    assert extra == {"note": "hello"} and fresh.step == 3
    got = _losses([train_step(fresh, iter(after), cfg) for _ in range(3)])
    for want, have in zip(expected, got):
        assert have.keys() == want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


def test_checkpoint_is_self_describing_and_weights_only(tmp_path):
    cfg = tiny_config()
    state = build_state(cfg, torch.device("cpu"))
    path = save_checkpoint(tmp_path / "ckpt", state, cfg)
    assert path.name == CHECKPOINT_FILE
    payload = torch.load(path, weights_only=True)  # no pickled code inside
    assert checkpoint_config(payload) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".checkpoint-")], "temp file left behind"


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config()
    state = build_state(cfg, torch.device("cpu"))
    save_checkpoint(tmp_path, state, cfg)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    state.step = 5

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state, cfg)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_FILE]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a gan_core/1 checkpoint"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing")


def test_export_generator_prefers_ema_and_loads(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    train_step(state, batches(cfg), cfg)
    save_checkpoint(tmp_path, state, cfg)
    slim = export_generator(tmp_path, tmp_path / "g.pt")
    assert slim.stat().st_size < (tmp_path / CHECKPOINT_FILE).stat().st_size
    generator = load_generator(slim)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(generator(x), state.generator_ema(x))
