"""The promotion gate at its defaults: no path moves a gated alias to a NaN model or to one that loses to bicubic.

The fast tests call `gate_promotion` and `evaluate_generator_checked` directly. The slow ones drive
jobs.promote and jobs.import_weights against a real `mlflow server`, with a registered model of their
own (test_lifecycle's `make_world`), in file order:
    nan           rrdb_tiny with one trunk weight filled with NaN: every output is NaN, scored as black
    nearest       test_lifecycle's nearest upsampler                     26.02 dB PSNR-Y, SSIM-Y 0.6885
    sharp-offset  torch bicubic, sharpened, 1.5/255 brighter             28.35 dB, SSIM-Y 0.7539
    bicubic       torch bicubic (a = -0.75: sharper than MATLAB's)       28.42 dB, SSIM-Y 0.7518
    sharp         torch bicubic, sharpened                               28.48 dB, SSIM-Y 0.7542
(MATLAB bicubic, the baseline, is 28.31 dB and SSIM-Y 0.7503 on these 96 px crops.) `bicubic` beats
`sharp-offset` on PSNR-Y but not on SSIM-Y, which is what the no-regression rule is for.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan_core.models import build_generator, rrdb_tiny
from jobs.tracking.registry import alias_holder, gate_promotion
from tests.jobs.test_lifecycle import CROP, fake_training_run, make_world, upsampler, version_tags

NAN_WEIGHT = "body.0.rdb1.conv1.weight"


@pytest.fixture(scope="module")
def world(mlflow_server, tmp_path_factory):
    """test_lifecycle's world, with this module's own experiment and registered model."""
    return make_world(mlflow_server, tmp_path_factory.mktemp("gate"))


def nan_generator() -> torch.nn.Module:
    """rrdb_tiny with one weight tensor filled with NaN, as a diverged training run leaves it."""
    torch.manual_seed(7)
    generator = rrdb_tiny()
    with torch.no_grad():
        generator.get_parameter(NAN_WEIGHT).fill_(math.nan)
    return generator.eval()


def above_bicubic(kind: str) -> torch.nn.Module:
    """An RRDBNet whose output is torch's bicubic upsampling (its `upsample_skip`) plus a fixed residual.

    The residual is beta * (nearest - tent2), both upsamplings computed in separate channels (all
    activations stay non-negative, so the LeakyReLUs are the identity), plus a constant offset.
    """
    beta, offset = {"bicubic": (0.0, 0.0), "sharp": (-0.15, 0.0), "sharp-offset": (-0.25, 1.5 / 255)}[kind]
    torch.manual_seed(7)
    generator = build_generator("rrdb", scale=4, num_feat=16, num_block=1, num_grow_ch=8, upsample_skip="bicubic")
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1.0
    tent = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.zero_()
        for channel in range(3):
            # channels 0-2 carry the image to tent2, channels 3-5 carry it unblurred (nearest)
            generator.conv_first.weight[channel, channel] = identity
            generator.conv_first.weight[channel + 3, channel] = identity
            for conv in (generator.conv_up1, generator.conv_up2):
                conv.weight[channel, channel] = identity
                conv.weight[channel + 3, channel + 3] = identity
            generator.conv_hr.weight[channel, channel] = tent
            generator.conv_hr.weight[channel + 3, channel + 3] = identity
            generator.conv_last.weight[channel, channel] = beta * tent
            generator.conv_last.weight[channel, channel + 3] = -beta * identity
        generator.conv_last.bias.fill_(offset)
    return generator.eval()


def promote(world, *extra: str) -> dict:
    """jobs.promote at the gate's default floors."""
    from jobs.promote import main

    return main(["--experiment", world["experiment"], "--registered-model", world["model"], "--metric",
                 "val/psnr_y", "--crop", CROP, "--tracking-uri", world["uri"], *extra])


def import_argv(world, path, *extra: str) -> list[str]:
    return ["--basicsr", str(path), "--arch", "basicsr", "--registered-model", world["model"], "--data", world["val"],
            "--crop", CROP,
            "--experiment", world["experiment"] + "-imports", "--tracking-uri", world["uri"], *extra]


def exit_status(main, argv) -> int:
    """What the shell would see: run_main's handling of JobError (2) and of sys.exit."""
    from jobs.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    return exit_info.value.code


# -- without a server ---------------------------------------------------------------------------------

GOOD = {"psnr_y": 28.5, "bicubic_psnr_y": 28.3, "gain_psnr_y": 0.2, "ssim_y": 0.76, "bicubic_ssim_y": 0.75,
        "images": 3.0, "nonfinite_images": 0.0}
FUSION_GAIN, DENOISE_GAIN = ("gain_qabf", "qabf", "average_qabf"), ("gain_psnr_y", "psnr_y", "input_psnr_y")
FUSION = {"qabf": 0.50, "average_qabf": 0.46, "gain_qabf": 0.04, "mi": 3.1, "average_mi": 3.0, "images": 3.0,
          "nonfinite_images": 0.0}
DENOISE = {"psnr_y": 30.0, "input_psnr_y": 25.0, "gain_psnr_y": 5.0, "ssim_y": 0.80, "input_ssim_y": 0.5,
           "images": 3.0, "nonfinite_images": 0.0}


@pytest.mark.parametrize(("candidate", "holder", "options", "failed"), [
    (GOOD, None, {}, ()),
    ({**GOOD, "psnr_y": 8.4, "gain_psnr_y": -19.9, "nonfinite_images": 3.0}, None, {}, ("finite", "gain")),
    ({k: v for k, v in GOOD.items() if k != "nonfinite_images"}, None, {}, ("finite",)),
    ({**GOOD, "lpips": math.nan}, None, {}, ("finite",)),
    ({**GOOD, "psnr_y": 28.3, "gain_psnr_y": 0.0}, None, {}, ("gain",)),  # equal to bicubic is not beating it
    ({**GOOD, "psnr_y": 28.3, "gain_psnr_y": 0.0}, None, {"min_gain": -0.5}, ()),
    (GOOD, {**GOOD, "psnr_y": 28.4, "ssim_y": 0.77}, {}, ("ssim_y",)),
    ({**GOOD, "lpips": 0.30}, {**GOOD, "psnr_y": 28.4, "lpips": 0.25}, {}, ("lpips",)),
    ({**GOOD, "lpips": 0.30}, {**GOOD, "psnr_y": 28.4, "lpips": math.nan}, {}, ()),  # a broken holder's LPIPS
    (GOOD, {**GOOD, "psnr_y": 28.4}, {"min_improvement": 0.5}, ("margin",)),
    (GOOD, GOOD, {}, ("margin",)),
    (GOOD, {**GOOD, "psnr_y": math.nan}, {}, ()),  # a holder that scores NaN does not block forever
    ({**GOOD, "lpips": 0.2}, {**GOOD, "lpips": 0.25}, {"metric": "val/lpips", "maximize": False}, ()),
    # Other tasks: their gain (gan_core.tasks' Task.gain) decides; PSNR-Y over bicubic is not asked for.
    (FUSION, None, {"metric": "val/qabf", "gain": FUSION_GAIN, "min_gain": 0.03}, ()),
    (FUSION, None, {"metric": "val/qabf", "gain": FUSION_GAIN, "min_gain": 0.05}, ("gain",)),
    (FUSION, {**FUSION, "qabf": 0.51}, {"metric": "val/qabf", "gain": FUSION_GAIN}, ("margin",)),
    ({**DENOISE, "psnr_y": 24.0, "gain_psnr_y": -1.0}, None, {"gain": DENOISE_GAIN}, ("gain",)),
    (DENOISE, {**DENOISE, "psnr_y": 29.5, "ssim_y": 0.85}, {"gain": DENOISE_GAIN}, ("ssim_y",)),
])
def test_gate_checks(candidate, holder, options, failed):
    decision = gate_promotion(candidate, holder, "4" if holder else None, alias="champion", **options)
    assert decision.failed == failed and decision.promote is (not failed)
    assert "\n" not in decision.reason
    if "finite" in failed and "nonfinite_images" in candidate:
        assert "not finite" in decision.reason or "non-finite" in decision.reason


def test_checked_evaluation_counts_nonfinite_outputs_and_keeps_the_means():
    from gan_core.scoring import NONFINITE_KEY, evaluate_generator, evaluate_generator_checked

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(2)]
    device = torch.device("cpu")
    plain = evaluate_generator(upsampler("tent"), images, device)
    checked = evaluate_generator_checked(upsampler("tent"), images, device)
    assert checked == {**plain, NONFINITE_KEY: 0.0}
    nan = nan_generator()
    with pytest.warns(RuntimeWarning):  # what used to be the only sign: NaN cast to uint8
        broken = evaluate_generator_checked(nan, images, device)
    assert broken[NONFINITE_KEY] == 2.0 and math.isfinite(broken["psnr_y"])  # black images score a finite PSNR
    assert not nan._forward_hooks  # the counting hook is removed


def test_import_with_alias_needs_data(tmp_path, capsys):
    from jobs import import_weights

    path = tmp_path / "tiny.pth"
    torch.save(rrdb_tiny().state_dict(), path)
    argv = ["--basicsr", str(path), "--registered-model", "m", "--alias", "champion"]
    assert exit_status(import_weights.cli, argv) == 2
    assert "--alias champion needs --data" in capsys.readouterr().err


# -- against a real mlflow server (file order) ----------------------------------------------------------

@pytest.mark.slow
def test_nan_basicsr_import_with_alias_is_registered_but_gets_no_alias(world, tmp_path, capsys):
    from jobs import import_weights

    path = tmp_path / "ESRGAN_nan_x4.pth"
    torch.save(nan_generator().state_dict(), path)  # plain BasicSR state dict
    assert exit_status(import_weights.cli, import_argv(world, path, "--alias", "champion")) == 1
    assert alias_holder(world["client"], world["model"], "champion") is None
    (version,) = world["client"].search_model_versions(f"name = '{world['model']}'")
    tags = version.tags
    assert tags["source"] == "basicsr" and tags["eval.nonfinite_images"] == "3"
    assert tags["promotion.decision"] == "refused" and tags["promotion.failed_checks"] == "finite,gain"
    assert "not finite (NaN/Inf) on 3 of 3" in tags["promotion.reason"]
    printed = capsys.readouterr().out
    refusal = [line for line in printed.splitlines() if line.startswith("REFUSED")]
    assert len(refusal) == 1 and "not finite" in refusal[0] and "bicubic" in refusal[0]
    world["nan_version"] = version.version


@pytest.mark.slow
def test_nan_training_run_is_refused_with_no_holder(world, capsys):
    run_id = fake_training_run(world, "nan", claimed_psnr=35.0, generator=nan_generator())
    result = promote(world, "--run-id", run_id)
    assert result["decision"] == "refused" and result["holder"] is None
    assert result["failed"] == ["finite", "gain"]
    assert alias_holder(world["client"], world["model"], "champion") is None
    assert version_tags(world, result["version"])["promotion.nonfinite_images"] == "3"
    assert "REFUSED" in capsys.readouterr().out


@pytest.mark.slow
def test_model_worse_than_bicubic_is_refused_with_no_holder(world):
    run_id = fake_training_run(world, "nearest", claimed_psnr=26.0)
    result = promote(world, "--run-id", run_id)
    assert result["decision"] == "refused" and result["failed"] == ["gain"]
    assert "required > 0" in result["reason"] and alias_holder(world["client"], world["model"], "champion") is None


@pytest.mark.slow
def test_first_model_above_bicubic_is_promoted(world):
    run_id = fake_training_run(world, "sharp-offset", claimed_psnr=28.35, generator=above_bicubic("sharp-offset"))
    result = promote(world, "--run-id", run_id)
    assert result["decision"] == "promoted", result["reason"]
    assert alias_holder(world["client"], world["model"], "champion") == result["version"]
    tags = version_tags(world, result["version"])
    assert 0.0 < float(tags["promotion.gain_psnr_y"]) < 0.1 and tags["promotion.failed_checks"] == "none"


@pytest.mark.slow
def test_better_psnr_but_worse_ssim_is_refused(world, capsys):
    holder = alias_holder(world["client"], world["model"], "champion")
    run_id = fake_training_run(world, "bicubic", claimed_psnr=28.42, generator=above_bicubic("bicubic"))
    result = promote(world, "--run-id", run_id)
    assert result["decision"] == "refused" and result["failed"] == ["ssim_y"]
    assert result["candidate"] > result["holder_value"]  # it does beat the holder on PSNR-Y
    assert f"worse than version {holder} on ssim_y" in result["reason"]
    assert alias_holder(world["client"], world["model"], "champion") == holder
    assert "REFUSED" in capsys.readouterr().out


@pytest.mark.slow
def test_better_on_every_metric_is_promoted(world):
    holder = alias_holder(world["client"], world["model"], "champion")
    run_id = fake_training_run(world, "sharp", claimed_psnr=28.48, generator=above_bicubic("sharp"))
    result = promote(world, "--run-id", run_id)
    assert result["decision"] == "promoted" and result["holder"] == holder, result["reason"]
    assert version_tags(world, holder)["promotion.superseded_by"] == result["version"]
    world["champion"] = result["version"]


@pytest.mark.slow
def test_import_with_alias_goes_through_the_gate(world, tmp_path):
    # BasicSR files cannot hold the bicubic skip, so these are below bicubic: the floor is lowered, as for
    # a perceptual baseline; the comparison with the holder still applies.
    from jobs import import_weights

    tent, nearest = tmp_path / "tent.pth", tmp_path / "nearest.pth"
    torch.save(upsampler("tent").state_dict(), tent)
    torch.save(upsampler("nearest").state_dict(), nearest)
    first = import_weights.main(import_argv(world, tent, "--alias", "baseline", "--min-gain-db", "-3"))
    assert first["decision"] == "promoted"
    assert alias_holder(world["client"], world["model"], "baseline") == first["version"]
    argv = import_argv(world, nearest, "--alias", "baseline", "--min-gain-db", "-3")
    assert exit_status(import_weights.cli, argv) == 1  # worse than tent on PSNR-Y and SSIM-Y
    assert alias_holder(world["client"], world["model"], "baseline") == first["version"]
    registered = world["client"].search_registered_models(f"name LIKE '{world['model']}%'")
    assert [m.name for m in registered] == [world["model"]], "the promotion lock was left behind"


@pytest.mark.slow
def test_rollback_to_a_nonfinite_version_needs_force(world, capsys):
    from jobs import promote as promote_job

    argv = ["--registered-model", world["model"], "--version", world["nan_version"], "--tracking-uri", world["uri"]]
    assert exit_status(promote_job.main, argv) == 2
    assert "non-finite outputs on 3 images; pass --force" in capsys.readouterr().err
    assert alias_holder(world["client"], world["model"], "champion") == world["champion"]
    forced = promote_job.main([*argv, "--force"])
    assert forced["version"] == world["nan_version"] and "forced" in capsys.readouterr().out
    promote_job.main(["--registered-model", world["model"], "--version", world["champion"],
                      "--tracking-uri", world["uri"]])
    assert alias_holder(world["client"], world["model"], "champion") == world["champion"]


@pytest.mark.slow
def test_every_version_the_gate_let_through_passed_it(world):
    # The tally: every version registered here, and which ones the gate let onto an alias.
    versions = world["client"].search_model_versions(f"name = '{world['model']}'")
    promoted = {mv.version for mv in versions if mv.tags.get("promotion.decision") == "promoted"}
    assert len(versions) == 8 and len(promoted) == 3  # sharp-offset, sharp, the tent import (baseline)
    for mv in versions:
        if mv.version in promoted:
            assert mv.tags["eval.nonfinite_images"] == "0"
            assert mv.tags["promotion.failed_checks"] == "none"
