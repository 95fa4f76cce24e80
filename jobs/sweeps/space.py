"""The search-space file of `jobs.tune`: schema, loading, validation against the training Config.

A space file names a base recipe, the metric, the scheduler, the search algorithm and the
distributions of any dotted config key. Everything is checked here, before Ray starts:

    space = load_space("tune_spaces/demo_asha.yaml")
    base = resolve_base_config(space, ["train.total_steps=100"])   # recipe + overrides, validated
    check_samples(space, base)                                     # every distribution bound fits the schema

Distributions (each a one-key mapping):
    {choice: [a, b, ...]}     one of the values, sampled uniformly
    {uniform: [lo, hi]}       float in [lo, hi]
    {loguniform: [lo, hi]}    float, log-uniform in [lo, hi], 0 < lo < hi
    {randint: [lo, hi]}       integer in [lo, hi], both ends included
    {grid: [a, b, ...]}       every value, once per sample (Tune's grid_search)

A distribution must fit the schema type of its key (`key_annotation`): uniform and loguniform sample
floats, so they are refused on an integer key (use randint) and on a key of fixed values such as
`generator.scale: Literal[1, 2, 4]` (use choice); randint fits integer and float keys. Choice and grid
values are checked one by one by `check_samples`.
"""

from __future__ import annotations

import difflib
import math
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gan_core.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    known_keys,
    read_yaml_mapping,
    set_dotted,
    validation_error,
    with_gpu_defaults,
    yaml_number,
)
from gan_core.scoring import REPORTED_KEYS

# What the training loop reports at each validation (gan_core.loop: `val/` + gan_core.scoring's keys).
REPORTED_METRICS = tuple(f"val/{key}" for key in REPORTED_KEYS)
TIME_ATTR = "step"  # schedulers count G steps (reported with every validation), not Tune iterations
DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


def _known_key(key: str) -> str:
    if key not in known_keys():
        close = difflib.get_close_matches(key, sorted(known_keys()), n=1)
        hint = f"did you mean {close[0]}?" if close else "see gan_core/config.py for the schema"
        raise ValueError(f"not a config key ({hint})")
    return key


ConfigKey = Annotated[str, AfterValidator(_known_key)]  # a dotted key of gan_core.config.Config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of the keys below; see the module docstring."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    grid: list[Any] | None = Field(None, min_length=1)

    @field_validator("choice", "grid")
    @classmethod
    def _numbers_as_numbers(cls, values: list[Any] | None) -> list[Any] | None:
        # YAML 1.1 reads `2e-4` (no dot) as a string; in a list of options it would stay one.
        return None if values is None else [yaml_number(v) for v in values]

    @model_validator(mode="after")
    def _one_kind_with_sane_bounds(self) -> Distribution:
        given = [name for name in DISTRIBUTION_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTION_KINDS)} (got {given or 'none'})")
        kind = given[0]
        if kind in ("uniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform" and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError(f"loguniform needs 0 < lo < hi, got [{self.loguniform[0]}, {self.loguniform[1]}]")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTION_KINDS if getattr(self, name) is not None)

    def bounds(self) -> list[Any]:
        """The values a sample can take at the edges: every option of a choice/grid, else lo and hi."""
        value = getattr(self, self.kind)
        return list(value)

    def to_tune(self):
        """The Ray Tune domain (randint's upper end is made inclusive)."""
        from ray import tune

        lo_hi = getattr(self, self.kind)
        return {
            "choice": lambda: tune.choice(self.choice),
            "uniform": lambda: tune.uniform(*lo_hi),
            "loguniform": lambda: tune.loguniform(*lo_hi),
            "randint": lambda: tune.randint(lo_hi[0], lo_hi[1] + 1),
            "grid": lambda: tune.grid_search(self.grid),
        }[self.kind]()

    def to_mutation(self):
        """What PBT resamples from: a list for choices (PBT then moves to a neighbouring value), else the domain."""
        return list(self.choice) if self.kind == "choice" else self.to_tune()


def key_annotation(key: str) -> Any:
    """The type annotation of a dotted key of gan_core.config.Config (`schedule.warmup_steps` -> int), found by
    walking the sections' model_fields; None when the key is not a field of a section."""
    model: type[BaseModel] = Config
    *sections, name = key.split(".")
    for section in sections:
        field = model.model_fields.get(section)
        # a section, or an optional one (`data.blind: BlindDegradationSection | None`)
        options = [field.annotation, *get_args(field.annotation)] if field is not None else []
        sections_here = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections_here:
            return None
        model = sections_here[0]
    field = model.model_fields.get(name)
    return field.annotation if field is not None else None


def _value_types(annotation: Any) -> set[type]:
    """The Python types a key's values take, None left out: `int | None` -> {int}, `list[int]` -> {list}."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_value_types(arg) for arg in get_args(annotation) if arg is not type(None)))
    if origin is Annotated:
        return _value_types(get_args(annotation)[0])
    if origin is Literal:
        return {type(value) for value in get_args(annotation)}
    return {origin or annotation}


def _literal_values(annotation: Any) -> list[Any]:
    """The fixed values of a `Literal[...]` key (also inside `| None`); empty for any other type."""
    origin = get_origin(annotation)
    if origin is Literal:
        return list(get_args(annotation))
    if origin in (Union, types.UnionType, Annotated):
        return [value for arg in get_args(annotation) for value in _literal_values(arg)]
    return []


def check_distribution_type(key: str, dist: Distribution) -> None:
    """Refuse a numeric distribution whose samples the key's schema type cannot take.

    The edge checks (`check_samples`) cannot see this: a uniform over [0, 10] has integer ends, which an
    int key accepts, while almost every sample in between (3.7) fails inside the trial.

    Raises:
        ValueError: uniform or loguniform on an integer key, or any range on a key of fixed values or a
            non-numeric key.
    """
    if dist.kind not in ("uniform", "loguniform", "randint"):
        return
    annotation = key_annotation(key)
    if annotation is None:
        return
    lo, hi = getattr(dist, dist.kind)
    kinds = _value_types(annotation)
    fixed = _literal_values(annotation)
    if fixed:
        raise ValueError(f"{key} takes only the values {fixed}, but {dist.kind} samples a range: "
                         f"use {{choice: [...]}} with some of them")
    if float in kinds:
        return  # uniform, loguniform and randint all fit a float key
    if int in kinds and dist.kind == "randint":
        return
    if int in kinds:
        low, high = math.ceil(lo), math.floor(hi)
        hint = f"{{randint: [{low}, {high}]}}" if low < high else "randint with integer bounds"
        raise ValueError(f"{key} is an integer key, but {dist.kind} samples floats ({lo:g}..{hi:g}): the edges pass "
                         f"the schema and every trial that samples a fraction fails; use {hint}"
                         + (" or a choice of values" if dist.kind == "loguniform" else ""))
    names = " or ".join(sorted(kind.__name__ for kind in kinds))
    raise ValueError(f"{key} takes {names} values, not numbers from {dist.kind}: use {{choice: [...]}}")


def _fit_key_types(dists: dict[str, Distribution]) -> dict[str, Distribution]:
    for key, dist in dists.items():
        check_distribution_type(key, dist)
    return dists


class FifoScheduler(_Strict):
    """Run every trial to the end."""

    name: Literal["fifo"]


class AshaScheduler(_Strict):
    """Asynchronous successive halving: stop trials below the top 1/reduction_factor at each rung (in steps)."""

    name: Literal["asha"]
    grace_period: int = Field(ge=1)  # steps before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)  # default: train.total_steps of the base recipe
    brackets: int = Field(1, ge=1)


class PbtScheduler(_Strict):
    """Population based training: every perturbation_interval steps, the bottom quantile clones a top trial's
    checkpoint and continues with mutated hyperparameters."""

    name: Literal["pbt"]
    perturbation_interval: int = Field(ge=1)  # steps; a multiple of train.ckpt_every
    burn_in_period: int = Field(0, ge=0)
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    perturbation_factors: tuple[float, float] = (1.2, 0.8)
    synch: bool = False  # wait for the whole population at each perturbation (each round restarts every trial)
    hyperparam_mutations: dict[ConfigKey, Distribution] = Field(min_length=1)

    @field_validator("hyperparam_mutations")
    @classmethod
    def _resampleable(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        grids = [key for key, dist in value.items() if dist.kind == "grid"]
        if grids:
            raise ValueError(f"grid cannot be mutated ({', '.join(grids)}): use choice, uniform, loguniform or randint")
        return _fit_key_types(value)

    def mutation_bounds(self) -> dict[str, tuple[float, float]]:
        """[lo, hi] of each numeric mutation: perturbed values (x0.8, x1.2) are clipped back into it."""
        return {key: tuple(getattr(dist, dist.kind)) for key, dist in self.hyperparam_mutations.items()
                if dist.kind in ("uniform", "loguniform", "randint")}


Scheduler = Annotated[FifoScheduler | AshaScheduler | PbtScheduler, Field(discriminator="name")]


class SpaceFile(_Strict):
    """A whole sweep."""

    base: str  # training recipe; relative paths are tried from the working directory, then the repository root
    metric: str = "val/psnr_y"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    search_alg: Literal["random", "optuna"] = "random"
    seed: int | None = None  # sampling seed (random and optuna)
    scheduler: Scheduler = Field(default_factory=lambda: FifoScheduler(name="fifo"))
    param_space: dict[ConfigKey, Distribution] = Field(default_factory=dict)
    overrides: dict[ConfigKey, Any] = Field(default_factory=dict)  # dotted key -> value, applied to the base recipe

    @field_validator("param_space")
    @classmethod
    def _distributions_fit_key_types(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        return _fit_key_types(value)

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        if value not in REPORTED_METRICS and not value.startswith("val/lpips"):
            raise ValueError(f"{value!r} is not reported by the training workers; "
                             f"use one of {', '.join(REPORTED_METRICS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SpaceFile:
        pbt = isinstance(self.scheduler, PbtScheduler)
        if not self.param_space and not pbt:
            raise ValueError("param_space is empty: name at least one config key to search")
        grids = [key for key, dist in self.param_space.items() if dist.kind == "grid"]
        if self.search_alg == "optuna" and grids:
            raise ValueError(f"search_alg optuna cannot sample grid ({', '.join(grids)}): "
                             "use choice, or search_alg random")
        if pbt and self.search_alg != "random":
            raise ValueError("scheduler pbt samples its own population: use search_alg random")
        both = sorted(set(self.param_space) & set(self.overrides))
        if both:
            raise ValueError(f"{', '.join(both)} both searched (param_space) and fixed (overrides): keep one")
        return self

    def searched_keys(self) -> list[str]:
        """Every key a trial's config may vary: the sampled ones, then those only PBT mutates."""
        keys = list(self.param_space)
        if isinstance(self.scheduler, PbtScheduler):
            keys += [key for key in self.scheduler.hyperparam_mutations if key not in keys]
        return keys

    def distributions(self) -> dict[str, Distribution]:
        """Each searched key's distribution (PBT's mutation range when the key is not sampled)."""
        found = dict(self.param_space)
        if isinstance(self.scheduler, PbtScheduler):
            for key, dist in self.scheduler.hyperparam_mutations.items():
                found.setdefault(key, dist)
        return found


# -- loading -----------------------------------------------------------------


def load_space(path: str | Path) -> SpaceFile:
    """Read and validate a space file.

    Args:
        path: YAML file in the format above.

    Returns:
        The validated SpaceFile.

    Raises:
        ConfigError: the file is missing, not YAML, or a key, value or distribution is wrong; the message
            names the path of every problem (e.g. `param_space.optim.g_lr: loguniform needs 0 < lo < hi`).
    """
    path = Path(path)
    data = read_yaml_mapping(path, "space file")
    try:
        space = SpaceFile.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, str(path)) from None
    space.base = str(_find_base(space.base, path))
    return space


def _find_base(base: str, space_path: Path) -> Path:
    candidates = [Path(base)] if Path(base).is_absolute() else [
        Path.cwd() / base, space_path.resolve().parent / base, space_path.resolve().parent.parent / base,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{space_path}: base recipe {base!r} not found (tried {', '.join(str(c) for c in candidates)})")


def resolve_base_config(space: SpaceFile, cli_overrides: list[str] | None = None, *, use_gpu: bool = False) -> Config:
    """The base recipe with the space's overrides, then the command line's `key=value`, applied and validated;
    with `use_gpu`, `GPU_DEFAULTS` fill the keys none of them sets.

    Raises:
        ConfigError: the recipe is unreadable, or an override names an unknown key or makes the config invalid.
    """
    data = read_yaml_mapping(space.base, "base recipe", "a mapping of sections")
    for key, value in space.overrides.items():
        set_dotted(data, key, value)
    data = apply_overrides(data, list(cli_overrides or []))
    if use_gpu:
        data = with_gpu_defaults(data)
    return config_from_dict(data, source=f"{space.base} with the space's and the command line's overrides")


def trial_config(base: dict[str, Any], params: dict[str, Any], source: str = "trial config") -> Config:
    """The config of one trial: the base recipe (as a dict) with each sampled dotted key set.

    Raises:
        ConfigError: the combination does not fit the schema.
    """
    return config_from_dict(base, source=source).with_values(params, source=source)


def check_samples(space: SpaceFile, base: Config) -> int:
    """Validate configs built from the edges of every distribution, before any trial starts.

    Each key takes each of its bound values (every option of a choice) with the others at their first
    bound; then every key at its last bound. Scheduler settings that depend on the recipe are checked too.

    Returns:
        How many configs were validated.

    Raises:
        ConfigError: naming the key and value that break the schema, or the scheduler setting at fault.
    """
    base_dict = base.model_dump(mode="json")
    dists = space.distributions()
    low = {key: dist.bounds()[0] for key, dist in dists.items()}
    high = {key: dist.bounds()[-1] for key, dist in dists.items()}
    checked = 0
    for key, dist in dists.items():
        for value in dist.bounds():
            try:
                cfg = trial_config(base_dict, low | {key: value}, source="param_space")
            except ConfigError as err:
                raise ConfigError(
                    f"param_space: {key}={value!r} (a bound of its {dist.kind}) makes an invalid config: {err}"
                ) from None
            _check_scheduler(space, cfg, f"with {key}={value!r}")
            checked += 1
    try:
        trial_config(base_dict, high, source="param_space")
    except ConfigError as err:
        raise ConfigError(f"every key at its upper bound ({high}) makes an invalid config: {err}") from None
    return checked + 1


def _check_scheduler(space: SpaceFile, cfg: Config, where: str) -> None:
    scheduler, train = space.scheduler, cfg.train
    if isinstance(scheduler, AshaScheduler):
        max_t = scheduler.max_t or train.total_steps
        if scheduler.grace_period >= max_t:
            raise ConfigError(
                f"scheduler.grace_period ({scheduler.grace_period}) must be below max_t ({max_t}) {where}"
            )
    if isinstance(scheduler, PbtScheduler):
        # An exploit clones the donor's checkpoint from its perturbation step: that report must carry one.
        for name in ("perturbation_interval", "burn_in_period"):
            value = getattr(scheduler, name)
            if value % train.ckpt_every:
                raise ConfigError(
                    f"scheduler.{name} ({value}) must be a multiple of train.ckpt_every ({train.ckpt_every}) {where}"
                )
        if scheduler.perturbation_interval >= train.total_steps:
            raise ConfigError(f"scheduler.perturbation_interval ({scheduler.perturbation_interval}) must be below "
                              f"train.total_steps ({train.total_steps}) {where}: no trial would ever be perturbed")


def clip_to_bounds(config: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """PBT's custom explore step: keep every perturbed value inside its mutation range (so inside the schema)."""
    for key, (lo, hi) in bounds.items():
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config[key] = type(value)(min(max(value, lo), hi))
    return config


def build_param_space(space: SpaceFile) -> dict[str, Any]:
    """Tune's param_space: dotted keys mapped to Tune domains."""
    return {key: dist.to_tune() for key, dist in space.param_space.items()}
