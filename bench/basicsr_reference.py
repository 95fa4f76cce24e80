"""BasicSR 1.4.2's own ESRGAN step, run standalone from its sdist (never vendored into this repository).

`make install` downloads the sdist into .venv/reference/ ($BASICSR_SDIST overrides the path). Its source files
run as they are: the RRDBNet and VGG-style discriminator (archs/), L1, perceptual and GAN losses (losses/), and
`ESRGANModel.optimize_parameters` with the base model's `model_ema` and `reduce_loss_dict` (models/). What
BasicSR's package import would pull in beyond them (its registries, logger, the compiled deformable-conv op, its
option parsing and data pipeline) is replaced by small stand-ins below; none of them is on the step's path.

One departure, for machines without its files: BasicSR's VGG feature extractor loads torchvision's pretrained
VGG19 (a download); here it gets the same network randomly initialised, which costs the same to run.
"""

from __future__ import annotations

import os
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SDIST = Path(os.environ.get("BASICSR_SDIST", ROOT / ".venv" / "reference" / "basicsr-1.4.2.tar.gz"))
GET_IT = ("pip download basicsr==1.4.2 --no-deps --no-build-isolation --no-binary :all: -d .venv/reference "
          "(or `make install`), or point $BASICSR_SDIST at the tarball")
FILES = ("archs/arch_util.py", "archs/rrdbnet_arch.py", "archs/discriminator_arch.py", "archs/vgg_arch.py",
         "losses/loss_util.py", "losses/basic_loss.py", "losses/gan_loss.py", "models/base_model.py",
         "models/esrgan_model.py")


class _Registry:
    def register(self, obj: Any = None, suffix: str | None = None):
        return obj if obj is not None else (lambda registered: registered)


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that its submodules import
    module.__dict__.update(attrs)
    return module


def load_basicsr(sdist: Path = SDIST) -> dict[str, types.ModuleType]:
    """BasicSR's step modules, executed from the sdist; keyed by their path under basicsr/ without .py.

    Raises:
        FileNotFoundError: the sdist is not there (the message says how to get it).
    """
    if not sdist.is_file():
        raise FileNotFoundError(f"BasicSR 1.4.2's sdist is missing at {sdist}: {GET_IT}")
    with tarfile.open(sdist) as archive:
        sources = {f: archive.extractfile(f"basicsr-1.4.2/basicsr/{f}").read().decode() for f in FILES}
    registry = _Registry()
    stubs = {
        "basicsr": _stub("basicsr"),
        "basicsr.utils": _stub("basicsr.utils", get_root_logger=lambda *a, **k: None),
        "basicsr.utils.registry": _stub("basicsr.utils.registry", ARCH_REGISTRY=registry, LOSS_REGISTRY=registry,
                                        MODEL_REGISTRY=registry),
        "basicsr.utils.dist_util": _stub("basicsr.utils.dist_util", master_only=lambda f: f),
        "basicsr.ops": _stub("basicsr.ops"),
        "basicsr.ops.dcn": _stub("basicsr.ops.dcn", ModulatedDeformConvPack=torch.nn.Module, modulated_deform_conv=None),
        "basicsr.archs": _stub("basicsr.archs"),
        "basicsr.losses": _stub("basicsr.losses"),
        "basicsr.models": _stub("basicsr.models", lr_scheduler=None),
    }
    try:
        import distutils.version  # noqa: F401  (arch_util imports LooseVersion; gone from Python 3.12)
    except ImportError:
        stubs["distutils"] = _stub("distutils")
        stubs["distutils.version"] = _stub("distutils.version", LooseVersion=str)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    modules: dict[str, types.ModuleType] = {}
    try:
        for file in FILES:
            dotted = "basicsr." + file[:-3].replace("/", ".")
            if file == "models/esrgan_model.py":  # ESRGANModel(SRGANModel): only its optimize_parameters runs
                sys.modules["basicsr.models.srgan_model"] = _stub("basicsr.models.srgan_model",
                                                                  SRGANModel=modules["models/base_model"].BaseModel)
            module = types.ModuleType(dotted)
            module.__package__ = dotted.rsplit(".", 1)[0]
            sys.modules[dotted] = module
            exec(compile(sources[file], f"basicsr/{file}", "exec"), module.__dict__)
            modules[file[:-3]] = module
    finally:
        for name in list(sys.modules):
            if name == "basicsr" or name.startswith("basicsr."):
                del sys.modules[name]
        sys.modules.update({name: module for name, module in saved.items() if module is not None})
    modules["archs/vgg_arch"].vgg = _RandomVGG  # no download; see the module docstring
    modules["archs/vgg_arch"].VGG_PRETRAIN_PATH = "/nonexistent"
    return modules


class _RandomVGG:
    """Stands in for torchvision.models.vgg inside BasicSR's vgg_arch: the network, randomly initialised."""

    @staticmethod
    def vgg19(pretrained: bool = False):
        import torchvision

        return torchvision.models.vgg19(weights=None)


def esrgan_model(basicsr: dict[str, types.ModuleType], *, num_feat: int, num_block: int, num_grow_ch: int,
                 d_feat: int, patch: int, device: torch.device, ema_decay: float = 0.999) -> Any:
    """An ESRGANModel set up as BasicSR's train_ESRGAN_x4.yml does (losses, Adam 1e-4, betas (0.9, 0.99)),
    its networks built by BasicSR's arch files; `model.optimize_parameters(step)` is BasicSR's step."""
    rrdb = basicsr["archs/rrdbnet_arch"].RRDBNet
    model = object.__new__(basicsr["models/esrgan_model"].ESRGANModel)
    model.opt = {"dist": False}
    model.device = device
    model.net_g = rrdb(3, 3, scale=4, num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch).to(device)
    model.net_g_ema = rrdb(3, 3, scale=4, num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch).to(device)
    model.net_g_ema.load_state_dict(model.net_g.state_dict())
    model.net_g_ema.eval()
    model.net_d = basicsr["archs/discriminator_arch"].VGGStyleDiscriminator(3, d_feat, input_size=patch).to(device)
    losses = basicsr["losses/basic_loss"]
    model.cri_pix = losses.L1Loss(loss_weight=1e-2, reduction="mean").to(device)
    model.cri_perceptual = losses.PerceptualLoss(layer_weights={"conv5_4": 1}, vgg_type="vgg19", use_input_norm=True,
                                                 perceptual_weight=1.0, style_weight=0, criterion="l1").to(device)
    model.cri_gan = basicsr["losses/gan_loss"].GANLoss("vanilla", real_label_val=1.0, fake_label_val=0.0,
                                                       loss_weight=5e-3).to(device)
    model.optimizer_g = torch.optim.Adam(model.net_g.parameters(), lr=1e-4, betas=(0.9, 0.99))
    model.optimizer_d = torch.optim.Adam(model.net_d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    model.net_d_iters, model.net_d_init_iters, model.ema_decay = 1, 0, ema_decay
    model.net_g.train()
    model.net_d.train()
    return model
