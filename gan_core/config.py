"""The typed schema of one training run, loaded from YAML with dotted overrides.

Every default of a training run lives here, once (model classes keep BasicSR's constructor defaults,
which a run never relies on: `gan_core.build` passes every argument from here). Loading fails on an
unknown key, a wrong type or a non-finite number with the dotted path of the key and what was expected,
before anything is built. A validated Config is frozen; `with_values` makes a changed, revalidated copy:

    cfg = load_config("jobs/configs/demo.yaml", ["optim.g_lr=2e-4", "train.total_steps=100"])
    cfg = cfg.with_values({"run.name": "demo-1"})
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from gan_core.blind_config import BlindDegradationSection, DegradationOrderSection  # noqa: F401 (re-exported)
from gan_core.config_base import ConfigError, _Section, validation_error  # noqa: F401 (validation_error re-exported)
from gan_core.task_config import TASK_METRIC_KEYS, TaskSection, check_task_fits  # noqa: F401 (re-exported)


class GeneratorSection(_Section):
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
    # false: the trunk of a x1 / x2 model runs at full resolution (no pixel-unshuffle); gan_core-only files.
    pixel_unshuffle: bool = True


class DiscriminatorSection(_Section):
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


# Layer names of torchvision's vgg19().features, in order (BasicSR's NAMES["vgg19"]); `convX_Y` is the
# feature before its ReLU. Here rather than in gan_core.losses so that validating a config imports no torch.
VGG19_LAYER_NAMES = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)  # fmt: skip


class LossSection(_Section):
    """Loss terms and their weights. A weight of 0 turns a term off."""

    pixel: Literal["l1", "charbonnier"] = "l1"
    pixel_weight: float = Field(1.0, ge=0.0)
    perceptual: Literal["none", "lpips", "vgg"] = "none"
    perceptual_weight: float = Field(1.0, ge=0.0)
    lpips_net: Literal["alex", "vgg"] = "alex"
    # File or folder with the torchvision backbone weights; else $GAN_CORE_WEIGHTS_DIR, then the torch hub cache.
    perceptual_weights_path: str | None = None
    # vgg only: VGG19 layer -> weight, summed (BasicSR's PerceptualLoss layer_weights); Real-ESRGAN uses
    # {conv1_2: 0.1, conv2_2: 0.1, conv3_4: 1, conv4_4: 1, conv5_4: 1}. None: conv5_4 alone, weight 1 (ESRGAN).
    perceptual_layers: dict[str, float] | None = None
    adversarial: Literal["vanilla", "relativistic", "lsgan", "hinge", "wgan"] = "relativistic"
    adversarial_weight: float = Field(5e-3, ge=0.0)
    gp_weight: float = Field(0.0, ge=0.0)  # WGAN-GP gradient penalty
    r1_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _known_layers(self) -> LossSection:
        if self.perceptual_layers is None:
            return self
        if self.perceptual != "vgg":
            raise ValueError(f"perceptual_layers needs perceptual: vgg (got perceptual: {self.perceptual})")
        unknown = sorted(set(self.perceptual_layers) - set(VGG19_LAYER_NAMES))
        if unknown:
            raise ValueError(f"perceptual_layers: unknown VGG19 layer(s) {unknown}; valid: {', '.join(VGG19_LAYER_NAMES)}")
        if not self.perceptual_layers or any(w < 0 for w in self.perceptual_layers.values()):
            raise ValueError("perceptual_layers: give at least one layer, each with a weight >= 0")
        return self


class OptimSection(_Section):
    """Adam for G and D (BasicSR's ESRGAN recipe)."""

    g_lr: float = Field(1e-4, gt=0.0)
    d_lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)  # max global L2 norm, per network
    fused: bool = False  # torch's fused Adam (one kernel for all parameters; on with --use-gpu)


class ScheduleSection(_Section):
    """Learning-rate schedule over the run's global step (the same shape for G and D).

    With `per_phase: true` the pixel-only pretraining and the GAN phase each get the whole schedule
    (warmup, then the named shape over the phase's own length; milestones and restart periods count from
    the phase's first step), so the GAN phase, and D, which trains only there, start at the full base LR.
    Without it one schedule spans the run, and a cosine has cut D's LR to its floor by a late GAN phase.
    """

    lr_schedule: Literal["constant", "cosine", "cosine_restarts", "multistep", "one_cycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0, then the schedule
    milestones: list[int] = Field(default_factory=list)  # multistep: steps where the LR is multiplied by gamma
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    restart_period: int | None = Field(None, ge=1)  # cosine_restarts; default: a quarter of the run
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # floor of cosine schedules, as a fraction of the base LR
    per_phase: bool = False  # restart the schedule at the GAN phase (train.pretrain_steps); see above
    gan_g_lr_scale: float = Field(1.0, gt=0.0, le=1.0)  # G's LR in the GAN phase: optim.g_lr times this


class DegradationSection(_Section):
    """How LR inputs are made from HR patches. Ranges are (low, high); (0, 0) turns a step off."""

    blur_sigma: tuple[float, float] = (0.0, 0.0)
    noise_sigma: tuple[float, float] = (0.0, 0.0)  # on the 0-255 scale
    poisson_scale: tuple[float, float] = (0.0, 0.0)
    jpeg_quality: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> DegradationSection:
        for key in ("blur_sigma", "noise_sigma", "poisson_scale", "jpeg_quality"):
            value = getattr(self, key)
            if value is not None and value[0] > value[1]:
                raise ValueError(f"{key}: low {value[0]} is above high {value[1]}")
        if self.jpeg_quality is not None and not (1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality: must lie in 1..100, got {self.jpeg_quality}")
        return self


class DataSection(_Section):
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
    degradation: DegradationSection = Field(default_factory=DegradationSection)
    # Real-ESRGAN's blind degradation instead: the sampler yields GT patches, the LR is made on the device
    blind: BlindDegradationSection | None = None
    max_val_images: int | None = Field(None, ge=1)
    val_crop: int | None = Field(None, ge=16)  # centre-crop validation HR images to this size (fast CPU validation)
    # memory: each worker decodes its whole shard into RAM (small sets). stream: Ray Data tasks read, decode and
    # crop (CPU tasks, on CPU-only nodes when there are some) and each worker takes a bounded stream of ready
    # patches, so worker memory does not grow with the data set (jobs/training/stream.py). Needs sampling: tile.
    loader: Literal["memory", "stream"] = "memory"
    prefetch_batches: int = Field(2, ge=1, le=64)  # stream: ready batches buffered per worker
    # stream: object store memory Ray Data may fill ahead of the workers (all of them): how far its tasks run ahead
    stream_buffer_mb: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _blind_fits(self) -> DataSection:
        if self.blind is None:
            return self
        if self.blind.pool_size % self.batch_size:
            raise ValueError(f"data.blind.pool_size ({self.blind.pool_size}) must be a multiple of data.batch_size "
                             f"({self.batch_size}), or 0 for no pool")
        if self.degradation != DegradationSection():
            raise ValueError("data.degradation and data.blind exclude each other: with data.blind the LR is made "
                             "on the device; leave data.degradation at its defaults")
        return self

    @model_validator(mode="after")
    def _stream_samples_tiles(self) -> DataSection:
        if self.loader == "stream" and self.sampling != "tile":
            raise ValueError("loader: 'stream' needs sampling: 'tile' (sampling by source needs the whole shard "
                             "in memory; use loader: 'memory')")
        return self


class TrainSection(_Section):
    """Phases, precision and cadence of one run."""

    total_steps: int = Field(1000, ge=1)  # G steps in all, pretraining included
    pretrain_steps: int = Field(0, ge=0)  # pixel-only (PSNR-oriented) steps before the GAN phase
    d_steps_per_g: int = Field(1, ge=1)
    d_warmup_steps: int = Field(0, ge=0)  # D-only steps at the start of the GAN phase
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # 0 turns the EMA generator off
    bf16: bool = False  # autocast to bfloat16 (on with --use-gpu; on a CPU with bf16 instructions it can pay too)
    channels_last: bool = False
    compile: bool = False  # torch.compile G and D
    # torch.compile's mode; "reduce-overhead" replays CUDA graphs (on a GPU; elsewhere it is "default")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    seed: int = 0
    init_from: str | None = None  # pretrained G: checkpoint dir/file, BasicSR .pth, or MLflow model URI
    val_every: int = Field(500, ge=1)
    ckpt_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads on CPU workers

    @model_validator(mode="after")
    def _phases_fit(self) -> TrainSection:
        if self.pretrain_steps > self.total_steps:
            raise ValueError(f"pretrain_steps ({self.pretrain_steps}) exceeds total_steps ({self.total_steps})")
        return self


class RunSection(_Section):
    """Tracking and fault tolerance. Plain data here; jobs/ turns it into Ray and MLflow settings."""

    name: str | None = None  # rerunning the same name resumes; default: recipe name + time
    experiment: str = "gan-enhance"  # MLflow experiment
    storage_path: str = "ray_results"  # local folder, NFS path or s3:// URI for checkpoints
    num_to_keep: int = Field(3, ge=1)
    checkpoint_metric: str = "val/psnr_y"  # fusion runs default to val/qabf (Config._task_defaults)
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the latest checkpoint


class Config(_Section):
    """A whole training run."""

    task: TaskSection = Field(default_factory=TaskSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    discriminator: DiscriminatorSection = Field(default_factory=DiscriminatorSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """A fusion run has no PSNR: unless the config names one, its checkpoints are ranked by val/qabf."""
        if not isinstance(data, dict) or not isinstance(data.get("task"), dict):
            return data
        run = data.get("run") or {}
        if data["task"].get("name") == "fusion" and isinstance(run, dict) and "checkpoint_metric" not in run:
            data = {**data, "run": {**run, "checkpoint_metric": TaskSection(name="fusion").default_checkpoint_metric}}
        return data

    @model_validator(mode="after")
    def _task_fits(self) -> Config:
        check_task_fits(self, degradation_default=DegradationSection())
        return self

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

    def with_values(self, updates: dict[str, Any], source: str = "config") -> Config:
        """A validated copy with each dotted key set, e.g. `{"run.name": "demo-1", "optim.g_lr": 2e-4}`.

        Raises:
            ConfigError: the result does not fit the schema.
        """
        data = self.model_dump(mode="json")
        for key, value in updates.items():
            set_dotted(data, key, value)
        return config_from_dict(data, source=source)


# -- loading -----------------------------------------------------------------


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `2e-4` (no dot) as a string; a string that is a number is read as the number meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `optim.g_lr=2e-4` into ("optim.g_lr", 0.0002); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.g_lr=2e-4")
    return key.strip(), yaml_number(yaml.safe_load(raw) if raw.strip() else None)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted(d, "optim.g_lr", 2e-4)` sets d["optim"]["g_lr"]; sections are created when missing.

    Raises:
        ConfigError: a part of the key names a value, not a section.
    """
    *sections, leaf = key.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {section} is a value, not a section")
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted `key=value` applied; unknown keys are caught at validation."""
    result = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(result, key, value)
    return result


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict; raise ConfigError naming every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, source, known_keys()) from None


# What a GPU run (`--use-gpu`) turns on unless the recipe or an override sets the key: bf16 autocast,
# channels_last, torch.compile and fused Adam. On the CPU none of them is a default (bf16 is slower there).
GPU_DEFAULTS: dict[str, Any] = {"train.bf16": True, "train.channels_last": True, "train.compile": True,
                                "optim.fused": True}


def load_config(path: str | Path, overrides: list[str] | None = None, *, use_gpu: bool = False) -> Config:
    """Load a YAML recipe and apply dotted overrides.

    Args:
        path: YAML file whose top-level keys are sections of `Config`.
        overrides: `section.key=value` strings; values are parsed as YAML.
        use_gpu: fill in `GPU_DEFAULTS` for every key of it that neither the recipe nor an override sets.

    Returns:
        The validated Config.

    Raises:
        ConfigError: the file is missing or not a mapping, or a key is unknown or of the wrong type.
    """
    data = apply_overrides(read_yaml_mapping(path, "config file", "a mapping of sections"), overrides or [])
    if use_gpu:
        data = with_gpu_defaults(data)
    return config_from_dict(data, source=str(path))


def with_gpu_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config mapping with each `GPU_DEFAULTS` key it does not set added."""
    given = set(flatten(data))
    result = copy.deepcopy(data)
    for key, value in GPU_DEFAULTS.items():
        if key not in given:
            set_dotted(result, key, value)
    return result


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
    """Every dotted key the schema accepts (sweep spaces are checked against it), including the keys inside
    optional sections such as `data.blind` (`data.blind.first.noise_range`), which default to None."""
    keys = set(flatten(Config().model_dump()))
    for prefix, section in _optional_sections(Config):
        keys |= _field_keys(section, f"{prefix}.")
    return keys


def _field_keys(model: type[BaseModel], prefix: str) -> set[str]:
    """The dotted keys of a section's fields; a dict-valued field (kernel_probs) is one key."""
    keys = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _field_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _optional_sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, section class) of every `Section | None` field, at any depth."""
    found = []
    for name, field in model.model_fields.items():
        options = [a for a in getattr(field.annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _optional_sections(field.annotation, f"{prefix}{name}.")
        elif options:
            found.append((f"{prefix}{name}", options[0]))
    return found
