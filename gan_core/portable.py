"""Generator files that other tools load: safetensors and a BasicSR-layout `.pth`.

Our RRDBNet keeps BasicSR's parameter names, so its state dict *is* a BasicSR state dict. The ESRGAN
loaders people run models with (spandrel, behind chaiNNer and ComfyUI; BasicSR; Real-ESRGAN's scripts)
read the architecture from those names and shapes and hard-code what weights cannot tell: growth
channels 32, residual scale 0.2, no upsampling skip. A generator trained with other values loads there
without an error and computes something else. Hence:

- `ecosystem_problems(config)` lists what keeps a generator from being BasicSR-exact.
- A BasicSR-exact generator is written under BasicSR's key names: a `.safetensors` file, and a `.pth`
  holding `{"params_ema": state_dict}` (the layout of BasicSR's and Real-ESRGAN's releases).
- Any other generator is written as safetensors only, its keys under `gan_core.` so that no ESRGAN
  loader detects it (spandrel raises UnsupportedModelError), the reason in its metadata. Only
  `gan_core.checkpoint.load_generator` reads it.

Every safetensors file we write carries the generator config in its metadata (`gan_core_generator`, JSON),
so our loader rebuilds the network exactly and never guesses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from gan_core.config import ConfigError, parse_override
from gan_core.files import atomic_torch_save, atomic_write

FORMAT = "gan_core/1"
CONFIG_KEY = "gan_core_generator"  # safetensors metadata: the JSON generator config
OURS_ONLY_PREFIX = "gan_core."  # tensor-name prefix of files that must not load elsewhere
# What BasicSR-format files leave implicit and every ESRGAN loader assumes (growth channels are read from
# shapes by us, hard-coded to 32 by spandrel).
BASICSR_ARCH = {"res_scale": 0.2, "upsample_skip": "none"}
ARCH_HELP = ("the architecture that plain weights cannot tell: 'basicsr' for BasicSR / Real-ESRGAN releases "
             "(res_scale 0.2, no upsampling skip), or KEY=VALUE pairs such as 'res_scale=0.3,upsample_skip=bicubic'")


@dataclasses.dataclass(frozen=True)
class PortableFiles:
    """What `write_portable` wrote.

    Attributes:
        safetensors: the safetensors file (always written).
        pth: the BasicSR-layout `.pth`, or None when the generator is not BasicSR-exact.
        problems: why the files load in gan_core only (empty when they load anywhere).
    """

    safetensors: Path
    pth: Path | None
    problems: tuple[str, ...]

    @property
    def loadable_elsewhere(self) -> bool:
        return not self.problems


def ecosystem_problems(config: dict[str, Any]) -> list[str]:
    """Why a generator with this config would compute something else in a BasicSR-style ESRGAN loader.

    Args:
        config: a generator config (`gan_core.models.generator_config`).

    Returns:
        One sentence per difference; empty when the generator is exactly BasicSR's RRDBNet.
    """
    problems = []
    if config.get("name", "rrdb") != "rrdb":
        problems.append(f"generator {config.get('name')!r} is not an RRDBNet")
    if int(config.get("num_grow_ch", 32)) != 32:
        problems.append(f"num_grow_ch is {config['num_grow_ch']} (ESRGAN loaders assume 32)")
    if abs(float(config.get("res_scale", 0.2)) - 0.2) > 1e-9:
        problems.append(f"res_scale is {config['res_scale']} (ESRGAN loaders assume 0.2)")
    if config.get("upsample_skip", "none") != "none":
        problems.append(f"upsample_skip is {config['upsample_skip']!r} (ESRGAN loaders have no upsampling skip)")
    if config.get("pixel_unshuffle", True) is False and int(config.get("scale", 4)) != 4:
        problems.append("pixel_unshuffle is off (ESRGAN loaders pixel-unshuffle x1 / x2 inputs)")
    return problems


def write_portable(out_dir: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor], step: int,
                   stem: str = "generator") -> PortableFiles:
    """Write `<stem>.safetensors` (always) and `<stem>.pth` (BasicSR-exact generators only), atomically.

    Args:
        out_dir: the folder (created).
        config: the generator config that rebuilds the network.
        weights: its state dict (unprefixed BasicSR names).
        step: the training step the weights come from (metadata).
        stem: the file names without suffix.

    Returns:
        The files written and the reasons they load in gan_core only, if any.
    """
    out_dir = Path(out_dir)
    problems = tuple(ecosystem_problems(config))
    tensors = {(OURS_ONLY_PREFIX + key if problems else key): value.detach().to("cpu").contiguous()
               for key, value in weights.items()}
    metadata = {
        "format": FORMAT,
        CONFIG_KEY: json.dumps(config, sort_keys=True),
        "step": str(step),
        "architecture": "ESRGAN RRDBNet (BasicSR key names)",
        "loadable_by": "gan_core only: " + "; ".join(problems) if problems else "any ESRGAN loader (spandrel, "
                       "chaiNNer, ComfyUI, BasicSR) and gan_core",
    }
    safetensors_file = atomic_write(out_dir / f"{stem}.safetensors",
                                    lambda handle: handle.write(safetensors_bytes(tensors, metadata)))
    pth_file = None
    if not problems:
        pth_file = atomic_torch_save({"params_ema": {key: t.clone() for key, t in tensors.items()}},
                                     out_dir / f"{stem}.pth")
    return PortableFiles(safetensors_file, pth_file, problems)


def read_safetensors(file: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights (unprefixed) and the generator config from its metadata (None when the file has none).

    Raises:
        ValueError: not a safetensors file, or its generator metadata is not a JSON object.
    """
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # noqa: BLE001 - the Rust reader raises its own error types
        raise ValueError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    weights = {key.removeprefix(OURS_ONLY_PREFIX): value for key, value in weights.items()}
    if CONFIG_KEY not in metadata:
        return weights, None
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: metadata {CONFIG_KEY!r} is not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: metadata {CONFIG_KEY!r} is not a JSON object")
    return weights, config


def parse_arch(text: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The caller's architecture for plain weights: 'basicsr', 'k=v,k=v', a dict, or None.

    Raises:
        ValueError: a pair without '=' (the message shows the accepted forms).
    """
    if text is None or isinstance(text, dict):
        return text
    if text.strip().lower() == "basicsr":
        return dict(BASICSR_ARCH)
    arch = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        try:
            key, value = parse_override(pair)
        except ConfigError:
            raise ValueError(f"--arch {text!r}: {pair!r} is not KEY=VALUE; expected {ARCH_HELP}") from None
        arch[key] = value
    return arch
