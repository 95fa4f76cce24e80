"""ONNX export (parity with onnxruntime at several sizes) and int8 static quantization (size, PSNR change).

The int8 checks use a generator trained for a few seconds on the demo photos by the training loop:
the PSNR change of quantization is only meaningful on weights shaped by training.
"""

import numpy as np
import pytest
import torch

from gan_core.config import config_from_dict
from gan_core.data import find_image_files, load_image, prepare_demo_folders, validation_pair
from gan_core.deploy import (
    export_onnx,
    load_int8,
    onnx_max_abs_diff,
    quantize_int8,
    save_int8,
    serialized_size,
)
from gan_core.loop import fit, make_sampler, setup_state
from gan_core.models import build_generator, generator_config, rrdb_tiny
from gan_core.scoring import center_crop, evaluate_images, mean_metrics

pytest.importorskip("onnxruntime")

ONNX_TOLERANCE = 1e-4
MAX_PSNR_DROP_DB = 1.0  # int8 may cost at most this much PSNR-Y on the validation photos
MAX_SIZE_RATIO = 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train_dir, val_dir = prepare_demo_folders(tmp_path_factory.mktemp("demo"))
    val = [center_crop(load_image(p), 96) for p in find_image_files(val_dir)]
    train = [torch.from_numpy(center_crop(load_image(p), 128).copy()).permute(2, 0, 1).contiguous()
             for p in find_image_files(train_dir)]
    return train, val


@pytest.fixture(scope="module")
def trained(demo):
    """rrdb_tiny's architecture after 200 L1 steps of the training loop (a few seconds) on 32 px demo patches."""
    torch.set_num_threads(1)
    train, _ = demo
    cfg = config_from_dict({
        "generator": {"num_feat": 16, "num_block": 1, "num_grow_ch": 8},
        "optim": {"g_lr": 2e-3}, "schedule": {"lr_schedule": "cosine"},
        "data": {"patch_size": 32, "batch_size": 8},
        "train": {"total_steps": 200, "pretrain_steps": 200, "ema_decay": 0, "log_every": 200},
    })
    state = setup_state(cfg, torch.device("cpu"))
    fit(state, iter(make_sampler(cfg, train)), cfg)
    return state.generator.eval()


def psnr_y(generator, images):
    return mean_metrics(evaluate_images(generator, images, 4, torch.device("cpu")))["psnr_y"]


@pytest.mark.parametrize("scale", [4, 2])
def test_onnx_parity_with_dynamic_height_and_width(tmp_path, scale):
    torch.manual_seed(0)
    generator = rrdb_tiny(scale=scale).eval()
    path = export_onnx(generator, tmp_path / "g.onnx")
    # Sizes other than the 32x32 tracing input, and a batch of 2: H, W and N must all be dynamic.
    inputs = [torch.rand(1, 3, 24, 40), torch.rand(2, 3, 18, 14), torch.rand(1, 3, 32, 32)]
    diff = onnx_max_abs_diff(generator, path, inputs)
    print(f"ONNX x{scale} max abs diff {diff:.3e}")
    assert diff < ONNX_TOLERANCE


@pytest.mark.slow
def test_onnx_parity_on_trained_generator_and_real_images(tmp_path, trained, demo):
    _, val = demo
    path = export_onnx(trained, tmp_path / "g.onnx")
    inputs = [validation_pair(center_crop(img, side), 4)[0] for img, side in zip(val, (96, 72, 50), strict=True)]
    diff = onnx_max_abs_diff(trained, path, inputs)
    print(f"ONNX trained max abs diff {diff:.3e} over LR sizes {[tuple(x.shape[-2:]) for x in inputs]}")
    assert diff < ONNX_TOLERANCE


@pytest.mark.slow
def test_float16_onnx_is_half_the_size_and_close_to_float32(tmp_path, trained, demo):
    import onnxruntime

    _, val = demo
    full, half = export_onnx(trained, tmp_path / "g.onnx"), export_onnx(trained, tmp_path / "g16.onnx", half=True)
    (graph_input,) = onnxruntime.InferenceSession(str(half), providers=["CPUExecutionProvider"]).get_inputs()
    assert graph_input.type == "tensor(float16)"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    inputs = [validation_pair(center_crop(img, side), 4)[0] for img, side in zip(val, (96, 72, 50), strict=True)]
    diff = onnx_max_abs_diff(trained, half, inputs)  # against the float32 model: what float16 costs
    print(f"ONNX float16 trained max abs diff {diff:.3e}")
    assert 1e-5 < diff < 1e-2  # float16 rounding shows (it is not the float32 graph), within 3 levels of 255


@pytest.mark.slow
def test_int8_size_and_psnr_change(trained, demo, tmp_path):
    _, val = demo
    quantized = quantize_int8(trained, [validation_pair(img, 4)[0] for img in val])
    # Static quantization really replaced the convs (quantize_dynamic would have left every one in float).
    float_convs = [n for n, m in quantized.named_modules() if type(m) is torch.nn.Conv2d]
    assert float_convs == [], f"convs left in float: {float_convs}"
    ratio = serialized_size(quantized) / serialized_size(trained)
    fp32, int8 = psnr_y(trained, val), psnr_y(quantized, val)
    print(f"int8 size ratio {ratio:.3f}; PSNR-Y fp32 {fp32:.3f} dB, int8 {int8:.3f} dB, change {int8 - fp32:+.3f} dB")
    assert fp32 > 24.0, "the training fixture did not train"
    assert ratio < MAX_SIZE_RATIO
    assert int8 - fp32 > -MAX_PSNR_DROP_DB
    # And it is really computing in int8: outputs differ from fp32, slightly.
    x = validation_pair(val[0], 4)[0]
    with torch.no_grad():
        assert 0 < (quantized(x) - trained(x)).abs().max() < 0.2
    # Saved and rebuilt without calibration data: bit-identical outputs.
    path = save_int8(quantized, trained, tmp_path / "g_int8.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_int8(path)(x), quantized(x), atol=0, rtol=0)


def test_int8_keep_float_leaves_named_convs_in_float():
    trained = rrdb_tiny().eval()
    quantized = quantize_int8(trained, [torch.rand(1, 3, 16, 16)], keep_float=("conv_first", "conv_last"))
    float_convs = sorted(n for n, m in quantized.named_modules() if type(m) is torch.nn.Conv2d)
    assert float_convs == ["conv_first", "conv_last"]
    with pytest.raises(ValueError, match="no module"):
        quantize_int8(trained, [torch.rand(1, 3, 16, 16)], keep_float=("conv_nope",))


def test_int8_rejects_empty_calibration_and_bad_backend():
    trained = rrdb_tiny().eval()
    with pytest.raises(ValueError, match="at least one"):
        quantize_int8(trained, [])
    with pytest.raises(ValueError, match="backend"):
        quantize_int8(trained, [torch.rand(1, 3, 8, 8)], backend="tpu")


def test_load_int8_rejects_other_files(tmp_path):
    torch.save({"format": "gan_core/1"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="int8"):
        load_int8(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_int8(tmp_path / "missing.pt")


def test_int8_file_rebuilds_every_generator_option(tmp_path):
    # The demo recipes use a bicubic skip and sweeps change res_scale: the int8 file must rebuild both,
    # not a network guessed from the weights' shapes (which carry neither).
    torch.manual_seed(0)
    config = {"name": "rrdb", "num_feat": 8, "num_block": 1, "num_grow_ch": 8, "res_scale": 0.5,
              "upsample_skip": "bicubic"}
    generator = build_generator(**config).eval()
    torch.nn.init.normal_(generator.conv_last.weight, std=0.01)  # the skip starts it at zero
    x = torch.rand(1, 3, 12, 16)
    quantized = quantize_int8(generator, [x])
    path = save_int8(quantized, generator, tmp_path / "g_int8.pt")
    assert torch.load(path, weights_only=True)["generator"] == generator_config(generator)
    with torch.no_grad():
        rebuilt = load_int8(path)(x)
        torch.testing.assert_close(rebuilt, quantized(x), atol=0, rtol=0)
        # Close to the float model, whose output is mostly the bicubic upscale of x: without the skip it is not.
        assert (rebuilt - generator(x)).abs().mean() < 0.05
        assert (rebuilt - x.new_zeros(1, 3, 48, 64)).abs().mean() > 0.2


@pytest.mark.slow
def test_enhanced_image_from_int8_model_is_close(trained, demo):
    # End to end through the uint8 path that users see.
    from gan_core.inference import enhance_image

    _, val = demo
    lr = (validation_pair(val[1], 4)[0][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    quantized = quantize_int8(trained, [validation_pair(img, 4)[0] for img in val])
    a, b = enhance_image(trained, lr, 4), enhance_image(quantized, lr, 4, tile=12, tile_overlap=8)
    assert a.shape == b.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0
