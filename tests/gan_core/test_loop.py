"""gan_core.loop in one process: cadence, the hooks, exact resume through the checkpoint hook, its manifests, the
inf/nan stop."""

import json
import shutil

import pytest
import torch

from gan_core.loop import Hooks, NonFiniteLossError, checkpointer, fit, make_sampler, restore, setup_state, validator
from gan_core.manifest import checkpoint_problem
from tests.gan_core.conftest import random_rgb, tiny_config

CPU = torch.device("cpu")


def _config(**train):
    return tiny_config(train={"total_steps": 8, "pretrain_steps": 2, "log_every": 3, "val_every": 4,
                              "ckpt_every": 6, **train},
                       loss={"adversarial": "wgan", "adversarial_weight": 0.1, "gp_weight": 10.0})


def _images():
    return [random_rgb(48, 56, seed=i) for i in range(3)]


class Recorder:
    """Hooks that remember what the loop handed out; checkpoints are copied before the loop removes them."""

    def __init__(self, state, cfg, sampler, keep):
        self.logs, self.reports, self.keep = [], [], keep
        self.hooks = Hooks(validate=validator(state, _images()[:1], cfg, CPU), log=self._log,
                           checkpoint=checkpointer(state, cfg, sampler), report=self._report)

    def _log(self, means, step):
        self.logs.append((step, means))

    def _report(self, metrics, directory):
        self.reports.append((metrics["step"], directory is not None))
        if directory is not None:
            shutil.copytree(directory, self.keep / f"step{metrics['step']}")


def _run(cfg, keep, resume_from=None):
    state = setup_state(cfg, CPU)
    sampler_state = restore(state, resume_from, cfg)[1] if resume_from else None
    sampler = make_sampler(cfg, _images(), sampler_state=sampler_state)
    recorder = Recorder(state, cfg, sampler, keep)
    last = fit(state, iter(sampler), cfg, recorder.hooks)
    return state, recorder, last


def test_cadence_and_hooks(tmp_path):
    cfg = _config()
    state, recorder, last = _run(cfg, tmp_path)
    assert state.step == 8
    # Logs every 3 steps and before every validation (4, 6, 8); validations every 4 and at each checkpoint (6, 8),
    # each logged too.
    assert [step for step, _ in recorder.logs] == [3, 4, 4, 6, 6, 8, 8]
    assert [step for step, means in recorder.logs if "val/psnr_y" in means] == [4, 6, 8]
    assert recorder.reports == [(4, False), (6, True), (8, True)]
    assert last["step"] == 8 and last["val/psnr_y"] > 0 and "val/gain_psnr_y" in last
    gan_window = dict(recorder.logs[-2][1])
    assert {"g/pix", "g/adv", "d/gp", "lr/g", "perf/img_per_s"} <= set(gan_window)
    # Window means: step 3's window holds steps 1-3, pretraining (no D) for steps 1-2 and GAN for step 3.
    assert "d/total" in dict(recorder.logs[0][1])
    assert sorted(p.name for p in (tmp_path / "step6").iterdir()) == ["checkpoint.pt", "manifest.json",
                                                                      "sampler_rank0.pt"]
    assert checkpoint_problem(tmp_path / "step6") is None


def test_resume_from_the_checkpoint_hook_is_exact(tmp_path):
    cfg = _config()
    _, whole, _ = _run(cfg, tmp_path / "whole")
    _, resumed, _ = _run(cfg, tmp_path / "resumed", resume_from=tmp_path / "whole" / "step6")
    # Steps 7-8 after a restore at 6 log exactly what the uninterrupted run logged (RNG, sampler, optimizers).
    def losses(entry):
        step, means = entry
        return step, {k: v for k, v in means.items() if not k.startswith("perf/")}

    assert losses(resumed.logs[-2]) == losses(whole.logs[-2])
    assert "g/pix" in resumed.logs[-2][1] and resumed.logs[-2][0] == 8
    assert resumed.reports == [(8, True)]


def test_every_worker_lists_its_files_and_rank_0_counts_the_workers(tmp_path):
    # Two workers' hooks, their folders merged the way Ray Train copies them into one checkpoint folder.
    cfg = _config()
    state = setup_state(cfg, CPU)
    merged = tmp_path / "checkpoint_000001"
    merged.mkdir()
    folders = [checkpointer(state, cfg, make_sampler(cfg, _images(), rank=rank), rank=rank, world_size=2)()
               for rank in (0, 1)]
    try:
        assert sorted(p.name for p in folders[1].iterdir()) == ["manifest_rank1.json", "sampler_rank1.pt"]
        head = json.loads((folders[0] / "manifest.json").read_text())
        assert head["world_size"] == 2 and sorted(head["files"]) == ["checkpoint.pt", "sampler_rank0.pt"]
        for file in folders[0].iterdir():
            shutil.copy(file, merged)
        assert "manifest_rank1.json is missing (worker 1's files did not arrive)" in checkpoint_problem(merged)
        for file in folders[1].iterdir():
            shutil.copy(file, merged)
        assert checkpoint_problem(merged) is None
    finally:
        for folder in folders:
            shutil.rmtree(folder)


def test_non_finite_loss_stops_with_a_hint():
    cfg = _config(total_steps=4, pretrain_steps=4)
    state = setup_state(cfg, CPU)
    with torch.no_grad():
        state.generator.conv_first.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss by step 3 \(g/pix=nan.*lower the learning rates"):
        fit(state, iter(make_sampler(cfg, _images())), cfg)


def test_resume_refuses_an_incomplete_checkpoint(tmp_path):
    cfg = _config()
    _run(cfg, tmp_path / "whole")
    folder = tmp_path / "whole" / "step6"
    (folder / "sampler_rank0.pt").write_bytes(b"")  # a copy cut short
    with pytest.raises(ValueError, match="incomplete.*sampler_rank0.pt"):
        restore(setup_state(cfg, CPU), folder, cfg)
