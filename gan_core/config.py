"""The typed schema of one training run, loaded from YAML with dotted overrides.

Every default lives here, once. Loading fails on an unknown key or a wrong type
with the dotted path of the key and what was expected, before anything is built:

    cfg = load_config("jobs/configs/demo.yaml", ["optim.g_lr=2e-4", "train.total_steps=100"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names each bad key."""


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default);
    # assignment is validated so that sweeps and overrides cannot smuggle in bad values.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GeneratorConfig(_Section):
    """RRDB generator; the fields are RRDBNet's keyword arguments."""

    name: Literal["rrdb"] = "rrdb"
    scale: Literal[1, 2, 4] = 4
    num_in_ch: int = Field(3, ge=1)
    num_out_ch: int = Field(3, ge=1)
    num_feat: int = Field(64, ge=1)
    num_block: int = Field(23, ge=1)
    num_grow_ch: int = Field(32, ge=1)
    res_scale: float = Field(0.2, gt=0.0, le=1.0)
    # Add an interpolation of the input to the output (residual learning); "none" is ESRGAN / BasicSR-exact.
    upsample_skip: Literal["none", "nearest", "bilinear", "bicubic"] = "none"


class DiscriminatorConfig(_Section):
    """VGG-style (ESRGAN) or U-Net with spectral norm (Real-ESRGAN)."""

    name: Literal["vgg", "unet"] = "vgg"
    num_feat: int = Field(64, ge=1)
    norm: Literal["batch", "none"] = "none"  # vgg only; BatchNorm is BasicSR's choice
    spectral_norm: bool = True  # vgg only; the U-Net always uses it

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `gan_core.models.build_discriminator`."""
        if self.name == "unet":
            return {"name": "unet", "num_feat": self.num_feat}
        return {"name": "vgg", "num_feat": self.num_feat, "norm": self.norm, "spectral_norm": self.spectral_norm}


class LossConfig(_Section):
    """Loss terms and their weights. A weight of 0 turns a term off."""

    pixel: Literal["l1", "charbonnier"] = "l1"
    pixel_weight: float = Field(1.0, ge=0.0)
    perceptual: Literal["none", "lpips", "vgg"] = "none"
    perceptual_weight: float = Field(1.0, ge=0.0)
    lpips_net: Literal["alex", "vgg"] = "alex"
    # File or folder with the torchvision backbone weights; else $GAN_CORE_WEIGHTS_DIR, then the torch hub cache.
    perceptual_weights_path: str | None = None
    adversarial: Literal["vanilla", "relativistic", "lsgan", "hinge", "wgan"] = "relativistic"
    adversarial_weight: float = Field(5e-3, ge=0.0)
    gp_weight: float = Field(0.0, ge=0.0)  # WGAN-GP gradient penalty
    r1_weight: float = Field(0.0, ge=0.0)


class OptimConfig(_Section):
    """Adam for G and D (BasicSR's ESRGAN recipe)."""

    g_lr: float = Field(1e-4, gt=0.0)
    d_lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)  # max global L2 norm, per network


class ScheduleConfig(_Section):
    """Learning-rate schedule over the run's global step (the same shape for G and D)."""

    lr_schedule: Literal["constant", "cosine", "cosine_restarts", "multistep", "one_cycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0, then the schedule
    milestones: list[int] = Field(default_factory=list)  # multistep: steps where the LR is multiplied by gamma
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    restart_period: int | None = Field(None, ge=1)  # cosine_restarts; default: a quarter of the run
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # floor of cosine schedules, as a fraction of the base LR


class DegradationConfig(_Section):
    """How LR inputs are made from HR patches. Ranges are (low, high); (0, 0) turns a step off."""

    blur_sigma: tuple[float, float] = (0.0, 0.0)
    noise_sigma: tuple[float, float] = (0.0, 0.0)  # on the 0-255 scale
    poisson_scale: tuple[float, float] = (0.0, 0.0)
    jpeg_quality: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> DegradationConfig:
        for key in ("blur_sigma", "noise_sigma", "poisson_scale", "jpeg_quality"):
            value = getattr(self, key)
            if value is not None and value[0] > value[1]:
                raise ValueError(f"{key}: low {value[0]} is above high {value[1]}")
        if self.jpeg_quality is not None and not (1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality: must lie in 1..100, got {self.jpeg_quality}")
        return self


class DataConfig(_Section):
    """Where the images are and how patches are drawn."""

    train: str = "data/demo/train_shards"  # folder of Parquet shards written by jobs.prepare_data
    val: str = "data/demo/val"  # folder of validation images (or of shards)
    patch_size: int = Field(128, ge=8)  # HR patch side; the LR side is patch_size / scale
    batch_size: int = Field(16, ge=1)  # per worker
    hflip: bool = True
    rot90: bool = True
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    # tile: every shard row (tile) equally often, as BasicSR; source: every source photo equally often, so the
    # tiles of one big photo do not dominate a small, mixed data set (needs the shards' `source` column)
    sampling: Literal["tile", "source"] = "tile"
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    max_val_images: int | None = Field(None, ge=1)
    val_crop: int | None = Field(None, ge=16)  # centre-crop validation HR images to this size (fast CPU validation)


class TrainConfig(_Section):
    """Phases, precision and cadence of one run."""

    total_steps: int = Field(1000, ge=1)  # G steps in all, pretraining included
    pretrain_steps: int = Field(0, ge=0)  # pixel-only (PSNR-oriented) steps before the GAN phase
    d_steps_per_g: int = Field(1, ge=1)
    d_warmup_steps: int = Field(0, ge=0)  # D-only steps at the start of the GAN phase
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # 0 turns the EMA generator off
    bf16: bool = False  # autocast to bfloat16 (GPU; on CPU it is slower)
    channels_last: bool = False
    compile: bool = False  # torch.compile G and D
    seed: int = 0
    init_from: str | None = None  # pretrained G: checkpoint dir/file, BasicSR .pth, or MLflow model URI
    val_every: int = Field(500, ge=1)
    ckpt_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads on CPU workers

    @model_validator(mode="after")
    def _phases_fit(self) -> TrainConfig:
        if self.pretrain_steps > self.total_steps:
            raise ValueError(f"pretrain_steps ({self.pretrain_steps}) exceeds total_steps ({self.total_steps})")
        return self


class RunConfig(_Section):
    """Tracking and fault tolerance. Plain data here; jobs/ turns it into Ray and MLflow settings."""

    name: str | None = None  # rerunning the same name resumes; default: recipe name + time
    experiment: str = "gan-enhance"  # MLflow experiment
    storage_path: str = "ray_results"  # local folder, NFS path or s3:// URI for checkpoints
    num_to_keep: int = Field(3, ge=1)
    checkpoint_metric: str = "val/psnr_y"
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the latest checkpoint


class Config(_Section):
    """A whole training run."""

    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        scale = self.generator.scale
        if self.data.patch_size % scale:
            raise ValueError(f"data.patch_size ({self.data.patch_size}) must be divisible by generator.scale ({scale})")
        if self.discriminator.name == "unet" and self.data.patch_size % 8:
            raise ValueError(f"data.patch_size ({self.data.patch_size}) must be divisible by 8 for the U-Net discriminator")
        if self.discriminator.name == "vgg" and self.data.patch_size < 32:
            raise ValueError("data.patch_size must be at least 32 for the VGG-style discriminator")
        return self

    @property
    def gan_enabled(self) -> bool:
        """Whether any step of this run trains the discriminator."""
        return self.train.pretrain_steps < self.train.total_steps


# -- loading -----------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `optim.g_lr=2e-4` into (["optim", "g_lr"], 0.0002); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.g_lr=2e-4")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads `2e-4` (no dot) as a string; numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted `key=value` applied; unknown keys are caught at validation."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict; raise ConfigError naming every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe and apply dotted overrides.

    Args:
        path: YAML file whose top-level keys are sections of `Config`.
        overrides: `section.key=value` strings; values are parsed as YAML.

    Returns:
        The validated Config.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown or of the wrong type.
    """
    data = read_yaml_mapping(path, "config file", "a mapping of sections")
    return config_from_dict(apply_overrides(data, overrides or []), source=str(path))


def read_yaml_mapping(path: str | Path, kind: str, expected: str = "a mapping") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is {}).

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping; the message names `kind` and the path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"g_lr": 1e-4}}` -> `{"optim.g_lr": 1e-4}` (for MLflow params and sweep keys)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a checkpoint and MLflow carry)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def known_keys() -> set[str]:
    """Every dotted key the schema accepts (sweep spaces are checked against it)."""
    return set(flatten(Config().model_dump()))


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in error["loc"][:-1])
        valid = sorted(k.rsplit(".", 1)[-1] for k in known_keys() if k.rsplit(".", 1)[0] == parent) if parent else sorted(Config.model_fields)
        return f"  {path}: unknown key (valid here: {', '.join(valid)})"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"  {path}: {error['msg']}{shown}"


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
