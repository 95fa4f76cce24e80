"""The `task` section of a run config: which enhancement task, and how its synthetic inputs are drawn.

Re-exported by gan_core.config. What each task does with it lives in gan_core/tasks.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gan_core.config_base import _Section

TASK_NAMES = ("sr", "denoise", "lowlight", "fusion")

_RESTORATION_KEYS = ("psnr", "ssim", "psnr_y", "ssim_y", "input_psnr_y", "input_ssim_y", "gain_psnr_y", "lpips")
_FUSION_METRICS = ("en", "sd", "sf", "mi", "qabf")
# The validation metrics each task reports (as `val/<key>`); gan_core.tasks computes them. The baseline of a task
# is scored alongside its output: bicubic upscaling (sr), the input itself (denoise, lowlight), the plain average
# of the two inputs (fusion); `gain_*` is the output's metric minus the baseline's.
TASK_METRIC_KEYS = {
    "sr": ("psnr", "ssim", "psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "hf_ratio", "bicubic_hf_ratio",
           "gain_psnr_y", "lpips"),
    "denoise": _RESTORATION_KEYS,
    "lowlight": _RESTORATION_KEYS,
    "fusion": (*_FUSION_METRICS, *(f"average_{key}" for key in _FUSION_METRICS), "gain_qabf"),
}


class TaskSection(_Section):
    """Which task a run trains, and the parameters of its synthetic inputs and content loss.

    Paired data (noisy/clean, low/high, ir/vi folders, or shards written from them) is used as it is; the
    synthetic parameters apply when the training data is a folder of clean images only (denoise, lowlight).
    Ranges are (low, high), drawn uniformly per patch.
    """

    name: Literal["sr", "denoise", "lowlight", "fusion"] = "sr"
    # denoise and lowlight on the luminance only (full-range BT.601 luma, as PIL's "L"): a 1-channel generator
    gray: bool = False
    # -- denoise: synthetic noise on clean images --
    noise: Literal["gaussian", "poisson", "mixed"] = "gaussian"  # mixed: each patch one or the other, 50/50
    noise_sigma: tuple[float, float] = (0.0, 50.0)  # Gaussian sigma on the 0-255 scale
    poisson_scale: tuple[float, float] = (0.05, 3.0)  # shot noise strength (Real-ESRGAN's poisson_scale_range)
    gray_noise_prob: float = Field(0.0, ge=0.0, le=1.0)  # colour images: noise equal on all channels this often
    val_noise_sigma: float = Field(25.0, ge=0.0, le=255.0)  # validation: Gaussian noise at this sigma
    # -- lowlight: synthetic darkening, dark = scale * clean ** gamma + Gaussian noise (Lv et al. 2018, MBLLEN) --
    dark_gamma: tuple[float, float] = (2.0, 3.5)
    dark_scale: tuple[float, float] = (0.2, 0.6)
    dark_noise_sigma: tuple[float, float] = (0.0, 8.0)  # on the 0-255 scale
    # -- fusion: the content loss (gan_core/losses/fusion.py). fusiongan: mean (F - IR)^2 + gradient_weight * mean
    # (lap F - lap VI)^2 (Ma et al. 2019); max: mean |F - max(IR, VI)| + gradient_weight * mean | |grad F| -
    # max(|grad IR|, |grad VI|) | (SeAFusion, Tang et al. 2022: the edges of both sources) --
    fusion_loss: Literal["fusiongan", "max"] = "fusiongan"
    fusion_intensity_weight: float = Field(1.0, ge=0.0)
    fusion_gradient_weight: float = Field(5.0, ge=0.0)

    @model_validator(mode="after")
    def _ranges(self) -> TaskSection:
        for key in ("noise_sigma", "poisson_scale", "dark_gamma", "dark_scale", "dark_noise_sigma"):
            low, high = getattr(self, key)
            if not 0 <= low <= high:
                raise ValueError(f"{key}: expected 0 <= low <= high, got ({low}, {high})")
        if self.dark_scale[1] > 1:
            raise ValueError(f"dark_scale: at most 1 (a darkening), got {self.dark_scale}")
        if self.gray and self.name in ("sr", "fusion"):
            raise ValueError(f"gray: only for denoise and lowlight (task {self.name} has its own channels)")
        return self

    @property
    def channels(self) -> tuple[int, int]:
        """(generator.num_in_ch, generator.num_out_ch) this task needs."""
        if self.name == "fusion":
            return 2, 1  # IR and visible luminance stacked in, the fused luminance out
        return (1, 1) if self.gray else (3, 3)

    @property
    def default_checkpoint_metric(self) -> str:
        return "val/qabf" if self.name == "fusion" else "val/psnr_y"


def check_task_fits(cfg, degradation_default) -> None:
    """The checks of a whole Config (gan_core.config.Config) that its task imposes: scale 1 and no SR degradation
    outside super-resolution, the generator's channels, RGB outputs for a perceptual loss, a checkpoint metric the
    task reports.

    Raises:
        ValueError: the first problem found.
    """
    task, generator = cfg.task, cfg.generator
    if task.name != "sr":
        if generator.scale != 1:
            raise ValueError(f"task {task.name} keeps the image size: set generator.scale: 1")
        if cfg.data.blind is not None or cfg.data.degradation != degradation_default:
            raise ValueError(f"data.degradation and data.blind are for task sr; task {task.name} makes its "
                             "inputs from the task section (or uses paired data)")
        if cfg.data.loader == "stream":
            raise ValueError(f"data.loader: stream cuts RGB super-resolution patches only; task {task.name} needs "
                             "data.loader: memory")
    if (generator.num_in_ch, generator.num_out_ch) != task.channels:
        raise ValueError(f"task {task.name}{' (gray)' if task.gray else ''} needs generator.num_in_ch: "
                         f"{task.channels[0]} and generator.num_out_ch: {task.channels[1]}")
    if task.channels[1] != 3 and cfg.loss.perceptual != "none" and cfg.loss.perceptual_weight > 0:
        raise ValueError(f"loss.perceptual needs RGB outputs; task {task.name} outputs one channel: "
                         "set loss.perceptual: none")
    metric = cfg.run.checkpoint_metric
    if metric.startswith("val/") and metric.removeprefix("val/") not in TASK_METRIC_KEYS[task.name] \
            and not metric.startswith("val/lpips"):
        raise ValueError(f"run.checkpoint_metric {metric} is not reported by task {task.name}; use one of "
                         + ", ".join(f"val/{k}" for k in TASK_METRIC_KEYS[task.name]))
