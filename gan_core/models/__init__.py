"""Generators, discriminators and named presets (files are read and written by `gan_core.checkpoint`).

Factories are literal dicts so go-to-definition works; `build_generator("rrdb",
scale=4, ...)` is what configs call, the presets are what people type.
"""

import inspect

from torch import nn

from gan_core.models.discriminators import (
    UNetDiscriminatorSN,
    VGGStyleDiscriminator,
    convert_legacy_spectral_norm_keys,
)
from gan_core.models.rrdb import RRDB, ResidualDenseBlock, RRDBNet

GENERATORS = {"rrdb": RRDBNet}
DISCRIMINATORS = {"vgg": VGGStyleDiscriminator, "unet": UNetDiscriminatorSN}


def _build(kind: str, registry: dict[str, type[nn.Module]], name: str, kwargs: dict) -> nn.Module:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {sorted(registry)}")
    cls = registry[name]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown} for {kind} {name!r} ({cls.__name__}); valid: {accepted}")
    return cls(**kwargs)


def build_generator(name: str = "rrdb", **kwargs) -> nn.Module:
    """Build a generator by registry name.

    Args:
        name: A key of GENERATORS.
        **kwargs: Constructor arguments of that generator (e.g. scale, num_block, res_scale).

    Returns:
        The freshly initialised generator (on the CPU, train mode).

    Raises:
        ValueError: If `name` is unknown; the message lists the valid names.
        TypeError: If a keyword is not an argument of that generator; the message names it.
    """
    return _build("generator", GENERATORS, name, kwargs)


def generator_config(generator: nn.Module) -> dict:
    """`{"name": ..., **constructor arguments}`: what `build_generator(**config)` rebuilds `generator` from.

    Raises:
        TypeError: the model is not one of GENERATORS (or does not record its arguments in `arch`).
    """
    name = next((key for key, cls in GENERATORS.items() if type(generator) is cls), None)
    if name is None or not isinstance(getattr(generator, "arch", None), dict):
        raise TypeError(f"{type(generator).__name__} is not a generator of {sorted(GENERATORS)}")
    return {"name": name, **generator.arch}


def build_discriminator(name: str = "vgg", **kwargs) -> nn.Module:
    """Build a discriminator by registry name.

    Args:
        name: A key of DISCRIMINATORS.
        **kwargs: Constructor arguments of that discriminator (e.g. num_feat, norm, spectral_norm).

    Returns:
        The freshly initialised discriminator (on the CPU, train mode).

    Raises:
        ValueError: If `name` is unknown; the message lists the valid names.
        TypeError: If a keyword is not an argument of that discriminator; the message names it.
    """
    return _build("discriminator", DISCRIMINATORS, name, kwargs)


def esrgan_x4(res_scale: float = 0.2) -> RRDBNet:
    """ESRGAN x4 generator (16.7 M parameters); loads BasicSR's ESRGAN_x4 weights."""
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32, res_scale=res_scale)


def realesrgan_x4plus(res_scale: float = 0.2) -> RRDBNet:
    """Real-ESRGAN x4plus generator: the same architecture as ESRGAN x4, other weights."""
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32, res_scale=res_scale)


def rrdb_small(scale: int = 4, res_scale: float = 0.2) -> RRDBNet:
    """A small RRDBNet (4 blocks, 32 features) for quick experiments on one GPU."""
    return RRDBNet(
        num_in_ch=3, num_out_ch=3, scale=scale, num_feat=32, num_block=4, num_grow_ch=16, res_scale=res_scale
    )


def rrdb_tiny(scale: int = 4, res_scale: float = 0.2) -> RRDBNet:
    """A tiny RRDBNet (1 block, 16 features) for CPU tests."""
    return RRDBNet(
        num_in_ch=3, num_out_ch=3, scale=scale, num_feat=16, num_block=1, num_grow_ch=8, res_scale=res_scale
    )


PRESETS = {
    "esrgan_x4": esrgan_x4,
    "realesrgan_x4plus": realesrgan_x4plus,
    "rrdb_small": rrdb_small,
    "rrdb_tiny": rrdb_tiny,
}

__all__ = [
    "DISCRIMINATORS",
    "GENERATORS",
    "PRESETS",
    "RRDB",
    "RRDBNet",
    "ResidualDenseBlock",
    "UNetDiscriminatorSN",
    "VGGStyleDiscriminator",
    "build_discriminator",
    "build_generator",
    "convert_legacy_spectral_norm_keys",
    "esrgan_x4",
    "generator_config",
    "realesrgan_x4plus",
    "rrdb_small",
    "rrdb_tiny",
]
