"""gan_core.models: BasicSR-compatible RRDBNet, discriminators, factories, the generator config."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gan_core.models import (
    DISCRIMINATORS,
    GENERATORS,
    PRESETS,
    RRDB,
    ResidualDenseBlock,
    RRDBNet,
    UNetDiscriminatorSN,
    VGGStyleDiscriminator,
    build_discriminator,
    build_generator,
    convert_legacy_spectral_norm_keys,
    esrgan_x4,
    generator_config,
    realesrgan_x4plus,
    rrdb_tiny,
)

# Names and shapes from BasicSR 1.4.2's RRDBNet(3, 3, scale=4, num_feat=64, num_block=23, num_grow_ch=32).
BASICSR_X4_SPOT_CHECK = {
    "conv_first.weight": (64, 3, 3, 3),
    "conv_first.bias": (64,),
    "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
    "body.0.rdb1.conv2.weight": (32, 96, 3, 3),
    "body.0.rdb1.conv5.weight": (64, 192, 3, 3),
    "body.11.rdb2.conv3.bias": (32,),
    "body.22.rdb3.conv4.weight": (32, 160, 3, 3),
    "body.22.rdb3.conv5.bias": (64,),
    "conv_body.weight": (64, 64, 3, 3),
    "conv_up1.weight": (64, 64, 3, 3),
    "conv_up2.bias": (64,),
    "conv_hr.weight": (64, 64, 3, 3),
    "conv_last.weight": (3, 64, 3, 3),
    "conv_last.bias": (3,),
}
# BasicSR's VGGStyleDiscriminator(3, 64, input_size=128).
BASICSR_VGG_SPOT_CHECK = {
    "conv0_0.weight": (64, 3, 3, 3),
    "conv0_0.bias": (64,),
    "conv0_1.weight": (64, 64, 4, 4),
    "bn0_1.running_mean": (64,),
    "conv2_1.weight": (256, 256, 4, 4),
    "bn4_1.num_batches_tracked": (),
    "linear1.weight": (100, 8192),
    "linear2.weight": (1, 100),
    "linear2.bias": (1,),
}


def _tiny_input(size=16, batch=2, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- RRDBNet -----------------------------------------------------------------


def test_esrgan_x4_matches_basicsr_parameter_count_and_keys():
    model = esrgan_x4()
    assert sum(p.numel() for p in model.parameters()) == 16_697_987
    shapes = _shapes(model)
    assert len(shapes) == 702  # 23 blocks x 3 dense blocks x 5 convs x 2 + 6 convs x 2
    for key, shape in BASICSR_X4_SPOT_CHECK.items():
        assert shapes[key] == shape, key
    assert "body.23.rdb1.conv1.weight" not in shapes
    assert _shapes(realesrgan_x4plus()) == shapes


def test_esrgan_x4_one_small_forward():
    with torch.no_grad():
        out = esrgan_x4().eval()(_tiny_input(16, batch=1))
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale, first_in_ch", [(1, 48), (2, 12), (4, 3)])
def test_tiny_preset_output_shape_per_scale(scale, first_in_ch):
    model = rrdb_tiny(scale=scale)
    assert model.conv_first.in_channels == first_in_ch  # pixel_unshuffle folds 16x / 4x pixels into channels
    with torch.no_grad():
        out = model(_tiny_input(16))
    assert out.shape == (2, 3, 16 * scale, 16 * scale)


def test_unsupported_scale_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        RRDBNet(scale=3)


def test_res_scale_scales_both_residuals():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    block = ResidualDenseBlock(num_feat=16, num_grow_ch=8, res_scale=1.0)
    with torch.no_grad():
        full_branch = block(x) - x
        block.res_scale = 0.2
        assert torch.allclose(block(x) - x, 0.2 * full_branch, atol=1e-6)
        block.res_scale = 0.0
        assert torch.equal(block(x), x)
        rrdb = RRDB(num_feat=16, num_grow_ch=8, res_scale=0.0)
        assert torch.equal(rrdb(x), x)


def test_res_scale_changes_the_output():
    torch.manual_seed(0)
    default = rrdb_tiny(scale=4)
    assert default.body[0].res_scale == 0.2 and default.body[0].rdb1.res_scale == 0.2
    other = rrdb_tiny(scale=4, res_scale=0.5)
    other.load_state_dict(default.state_dict())
    x = _tiny_input(16)
    with torch.no_grad():
        assert not torch.allclose(default(x), other(x), atol=1e-4)


def test_dense_block_init_is_scaled_kaiming_with_zero_bias():
    torch.manual_seed(0)
    model = RRDBNet(num_feat=32, num_block=2, num_grow_ch=16)
    conv5 = model.body[1].rdb2.conv5
    fan_in = conv5.in_channels * 9
    expected_std = 0.1 * math.sqrt(2.0 / fan_in)
    assert conv5.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    assert torch.count_nonzero(conv5.bias) == 0
    # The convs outside the dense blocks keep PyTorch's default init, as in BasicSR.
    assert model.conv_first.weight.std().item() > 5 * expected_std


def test_channels_last_input_gives_the_same_output_and_backward_works():
    torch.manual_seed(0)
    model = rrdb_tiny(scale=2)
    x = _tiny_input(16)
    with torch.no_grad():
        reference = model(x)
        out_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(reference, out_cl, atol=1e-5)
    out = model(x)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_output_is_not_clamped():
    model = rrdb_tiny(scale=4)
    with torch.no_grad():
        model.conv_last.bias.fill_(5.0)
        out = model(_tiny_input(8))
    assert out.max() > 1.0


# --- discriminators ----------------------------------------------------------


def test_vgg_discriminator_keys_match_basicsr_at_128px():
    shapes = _shapes(VGGStyleDiscriminator(num_in_ch=3, num_feat=64))
    assert len(shapes) == 60
    for key, shape in BASICSR_VGG_SPOT_CHECK.items():
        assert shapes[key] == shape, key
    assert "conv0_1.bias" not in shapes  # BasicSR: no bias before batch norm


@pytest.mark.parametrize("size", [96, 128, 192])
def test_vgg_discriminator_accepts_sizes(size):
    d = VGGStyleDiscriminator(num_in_ch=3, num_feat=8)
    out = d(torch.rand(2, 3, size, size))
    assert out.shape == (2, 1)


def test_vgg_discriminator_pool_is_identity_at_128px():
    d = VGGStyleDiscriminator(num_in_ch=3, num_feat=8).eval()
    x = torch.rand(1, 3, 128, 128)
    seen = {}
    d.pool.register_forward_hook(lambda module, args, out: seen.update(inp=args[0], out=out))
    d(x)
    assert seen["inp"].shape[-2:] == (4, 4)
    assert torch.equal(seen["inp"], seen["out"])


def test_vgg_discriminator_rejects_small_input_and_bad_options():
    with pytest.raises(ValueError, match="32"):
        VGGStyleDiscriminator(num_feat=8)(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        VGGStyleDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="norm='none'"):
        VGGStyleDiscriminator(norm="batch", spectral_norm=True)


def test_vgg_discriminator_without_norm_has_biased_convs_and_no_bn():
    shapes = _shapes(VGGStyleDiscriminator(num_feat=8, norm="none"))
    assert not any(key.startswith("bn") for key in shapes)
    assert "conv3_1.bias" in shapes


def test_vgg_spectral_norm_variant_is_parametrized():
    d = VGGStyleDiscriminator(num_in_ch=3, num_feat=8, norm="none", spectral_norm=True)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 12
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VGGStyleDiscriminator(num_feat=8),
        lambda: VGGStyleDiscriminator(num_feat=8, norm="none", spectral_norm=True),
        lambda: UNetDiscriminatorSN(num_feat=8),
    ],
    ids=["vgg-bn", "vgg-sn", "unet"],
)
def test_discriminators_leave_input_alone_and_support_gradient_penalty(make):
    d = make()
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    before = x.detach().clone()
    logits = d(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    (grad.square().sum() + logits.mean()).backward()  # the double backward of a gradient penalty
    assert torch.equal(x.detach(), before)
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)


def test_unet_discriminator_gives_per_pixel_logits():
    d = UNetDiscriminatorSN(num_in_ch=3, num_feat=8)
    assert d(torch.rand(2, 3, 32, 48)).shape == (2, 1, 32, 48)
    no_skip = UNetDiscriminatorSN(num_in_ch=3, num_feat=8, skip_connection=False)
    assert no_skip(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    sn = [name for name, m in d.named_modules() if parametrize.is_parametrized(m, "weight")]
    assert sn == [f"conv{i}" for i in range(1, 9)]  # conv0 and conv9 without spectral norm, as BasicSR
    with pytest.raises(ValueError, match="divisible by 8"):
        d(torch.rand(1, 3, 36, 36))


def test_legacy_spectral_norm_keys_convert_to_parametrizations():
    torch.manual_seed(0)
    legacy = torch.nn.utils.spectral_norm(nn.Conv2d(4, 6, 3, 1, 1, bias=False))
    modern = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 6, 3, 1, 1, bias=False))
    legacy(torch.rand(1, 4, 8, 8))  # a few power iterations so u, v are not the initial ones
    converted = convert_legacy_spectral_norm_keys({f"conv1.{k}": v for k, v in legacy.state_dict().items()})
    assert sorted(converted) == sorted(f"conv1.{k}" for k in modern.state_dict())
    modern.load_state_dict({k.removeprefix("conv1."): v for k, v in converted.items()})
    legacy.eval(), modern.eval()
    x = torch.rand(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(legacy(x), modern(x), atol=1e-6)


# --- factories -----------------------------------------------------------------


def test_build_functions_and_registries():
    # Drift check: every preset is a generator the config schema can describe and build_generator rebuild.
    from gan_core.config import GeneratorSection

    for name, preset in PRESETS.items():
        config = generator_config(preset())
        GeneratorSection(**config)
        assert generator_config(build_generator(**config)) == config, name
    assert set(GENERATORS.values()) == {RRDBNet} and set(DISCRIMINATORS.values()) == {VGGStyleDiscriminator,
                                                                                      UNetDiscriminatorSN}
    g = build_generator("rrdb", scale=2, num_feat=16, num_block=1, num_grow_ch=8, res_scale=0.1)
    assert isinstance(g, RRDBNet) and g.scale == 2 and g.res_scale == 0.1
    assert isinstance(build_discriminator("unet", num_feat=8), UNetDiscriminatorSN)
    assert isinstance(build_discriminator(num_feat=8), VGGStyleDiscriminator)


def test_build_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'srvgg'.*\['rrdb'\]"):
        build_generator("srvgg")
    with pytest.raises(ValueError, match=r"\['unet', 'vgg'\]"):
        build_discriminator("patchgan")
    with pytest.raises(TypeError, match="num_blocks"):
        build_generator("rrdb", num_blocks=3)
    with pytest.raises(TypeError, match="spectral_norm"):
        build_discriminator("unet", spectral_norm=True)


# --- torch.compile ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: rrdb_tiny(scale=2), 16),
        (lambda: VGGStyleDiscriminator(num_feat=8, norm="none", spectral_norm=True), 32),
        (lambda: UNetDiscriminatorSN(num_feat=8), 32),
    ],
    ids=["rrdb", "vgg-sn", "unet"],
)
def test_models_compile_without_graph_breaks(make, size):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    x = _tiny_input(size)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()  # eval: spectral norm does not advance its power iteration, so both calls see the same weights
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsample_skip_starts_at_the_interpolation_and_keeps_keys(mode):
    from gan_core.models import rrdb_tiny
    from gan_core.models.rrdb import RRDBNet

    plain = rrdb_tiny()
    skip = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8, upsample_skip=mode)
    assert plain.state_dict().keys() == skip.state_dict().keys()
    x = torch.rand(1, 3, 8, 8)
    expected = torch.nn.functional.interpolate(x, scale_factor=4, mode=mode)
    torch.testing.assert_close(skip(x), expected)


def test_upsample_skip_rejects_unknown_mode():
    from gan_core.models.rrdb import RRDBNet

    with pytest.raises(ValueError, match="upsample_skip must be one of"):
        RRDBNet(upsample_skip="lanczos")


def test_generator_config_rebuilds_the_network_with_every_option():
    generator = build_generator("rrdb", scale=2, num_feat=8, num_block=2, num_grow_ch=4, res_scale=0.3,
                                upsample_skip="bilinear")
    config = generator_config(generator)
    assert config == {"name": "rrdb", "num_in_ch": 3, "num_out_ch": 3, "scale": 2, "num_feat": 8, "num_block": 2,
                      "num_grow_ch": 4, "res_scale": 0.3, "upsample_skip": "bilinear"}
    rebuilt = build_generator(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in generator.state_dict().items()}
    with pytest.raises(TypeError, match="not a generator"):
        generator_config(nn.Conv2d(3, 3, 3))


@pytest.mark.parametrize("scale", [1, 2])
def test_full_resolution_trunk_keeps_the_keys_and_sees_every_pixel(scale):
    """pixel_unshuffle=False: conv_first takes the image itself (not 4 or 16 folded pixels), the same weight names
    with the same shapes elsewhere, the output at `scale`; recorded in the config (and only when off)."""
    folded = build_generator("rrdb", scale=scale, num_feat=8, num_block=1, num_grow_ch=4)
    full = build_generator("rrdb", scale=scale, num_feat=8, num_block=1, num_grow_ch=4, pixel_unshuffle=False)
    assert folded.state_dict().keys() == full.state_dict().keys()
    assert full.conv_first.in_channels == 3 and folded.conv_first.in_channels == 3 * (4 // scale) ** 2
    assert all(full.state_dict()[k].shape == v.shape for k, v in folded.state_dict().items() if "conv_first" not in k)
    x = torch.rand(1, 3, 6, 10)  # no multiple of 4 or 2 needed without the unshuffle
    assert full(x).shape == (1, 3, 6 * scale, 10 * scale)
    assert "pixel_unshuffle" not in generator_config(folded) and generator_config(full)["pixel_unshuffle"] is False
    assert build_generator(**generator_config(full)).conv_first.in_channels == 3
    # Every output pixel depends on its own input pixel through the full-resolution trunk: a one-pixel change
    # moves the output at that pixel most (the folded trunk spreads it over its 4x4 / 2x2 block).
    full.eval()
    with torch.no_grad():
        for conv in (full.conv_last,):
            conv.weight.normal_(0, 0.1)
        bumped = x.clone()
        bumped[0, :, 3, 5] += 0.5
        change = (full(bumped) - full(x)).abs().sum(dim=1)[0]
    assert change.argmax().item() // change.shape[1] in range(3 * scale - 1, 3 * scale + scale + 1)
