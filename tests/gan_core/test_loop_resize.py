"""An elastic resize seen from gan_core.loop: a checkpoint written by a group of another size restores the
models and the step but no sampler position; the global batch is split over the new group."""

from __future__ import annotations

import shutil

import pytest
import torch

from gan_core.loop import (
    checkpoint_world_size,
    checkpointer,
    make_sampler,
    per_worker_batch,
    resized_data_seed,
    restore,
    setup_state,
)
from tests.gan_core.conftest import random_rgb, tiny_config

CPU = torch.device("cpu")


def _images():
    return [random_rgb(48, 48, seed=i) for i in range(4)]


def _two_worker_checkpoint(cfg, folder):
    state = setup_state(cfg, CPU)
    state.step = 7
    folder.mkdir()
    for rank in (0, 1):
        written = checkpointer(state, cfg, make_sampler(cfg, _images(), rank=rank), rank=rank, world_size=2)()
        for file in written.iterdir():
            shutil.copy(file, folder)
        shutil.rmtree(written)
    return folder


def test_same_size_restores_sampler_other_size_does_not(tmp_path):
    cfg = tiny_config()
    folder = _two_worker_checkpoint(cfg, tmp_path / "ckpt")
    assert checkpoint_world_size(folder) == 2
    state = setup_state(cfg, CPU)
    _, sampler_state = restore(state, folder, cfg, rank=1, world_size=2)
    assert state.step == 7 and sampler_state is not None
    for rank, size in ((0, 1), (1, 3), (2, 3)):  # shrunk to 1, grown to 3 (rank 2 never had a sampler file)
        state = setup_state(cfg, CPU)
        _, sampler_state = restore(state, folder, cfg, rank=rank, world_size=size)
        assert state.step == 7 and sampler_state is None
    _, sampler_state = restore(setup_state(cfg, CPU), folder, cfg, rank=0)  # no world size given: as before
    assert sampler_state is not None


def test_resized_sampler_draws_new_patches():
    cfg = tiny_config()
    first = next(make_sampler(cfg, _images()))[1]
    reseeded = next(make_sampler(cfg, _images(), seed=resized_data_seed(cfg.train.seed, 40)))[1]
    assert not torch.equal(first, reseeded)
    assert resized_data_seed(0, 40) != resized_data_seed(0, 50)


@pytest.mark.parametrize("global_batch, world_size, expected", [(4, 2, [2, 2]), (4, 1, [4]), (8, 3, [3, 3, 2]),
                                                                 (5, 5, [1, 1, 1, 1, 1])])
def test_per_worker_batch_splits_the_global_batch(global_batch, world_size, expected):
    shares = [per_worker_batch(global_batch, rank, world_size) for rank in range(world_size)]
    assert shares == expected and sum(shares) == global_batch


def test_per_worker_batch_needs_a_patch_per_worker():
    with pytest.raises(ValueError, match="cannot be split over 3 workers"):
        per_worker_batch(2, 0, 3)
