"""`data.blind`: Real-ESRGAN's second-order degradation as config sections (defaults: BasicSR 1.4.2's
options/train_realesrgan_x4plus.yml). Part of the run schema in gan_core.config; the code that draws from it
is gan_core.data.realesrgan.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from gan_core.config_base import _Section


KernelType = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
_REAL_ESRGAN_KERNEL_SIZES = [7, 9, 11, 13, 15, 17, 19, 21]
_REAL_ESRGAN_KERNEL_PROBS = {"iso": 0.45, "aniso": 0.25, "generalized_iso": 0.12, "generalized_aniso": 0.03,
                             "plateau_iso": 0.12, "plateau_aniso": 0.03}


def _check_kernel_sizes(sizes: list[int]) -> list[int]:
    if not sizes:
        raise ValueError("needs at least one kernel size")
    bad = [size for size in sizes if size < 3 or size % 2 == 0]
    if bad:
        raise ValueError(f"kernel sizes must be odd and at least 3, got {bad}")
    return sizes


def _check_probs(probs: list[float] | tuple[float, ...], what: str) -> None:
    if any(not 0.0 <= p <= 1.0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{what} must be probabilities in [0, 1] that sum to 1, got {list(probs)}")


class DegradationOrderSection(_Section):
    """One order of Real-ESRGAN's degradation: blur, random resize, noise, JPEG. Names and defaults are
    Real-ESRGAN's (options/train_realesrgan_x4plus.yml, first order); ranges are (low, high), low <= high."""

    blur_prob: float = Field(1.0, ge=0.0, le=1.0)  # Real-ESRGAN always blurs in the first order (second: 0.8)
    kernel_sizes: list[int] = Field(default_factory=lambda: list(_REAL_ESRGAN_KERNEL_SIZES))  # odd, drawn uniformly
    kernel_probs: dict[KernelType, float] = Field(default_factory=lambda: dict(_REAL_ESRGAN_KERNEL_PROBS))
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape; low <= 1 <= high
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape; low <= 1 <= high
    sinc_prob: float = Field(0.1, ge=0.0, le=1.0)  # a sinc (ringing) kernel instead of the mixed ones
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)  # 0 < low <= 1 <= high
    gaussian_noise_prob: float = Field(0.5, ge=0.0, le=1.0)  # else Poisson noise
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma on the 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = Field(0.4, ge=0.0, le=1.0)
    jpeg_range: tuple[float, float] = (30.0, 95.0)  # quality, within 1..100

    @field_validator("kernel_sizes")
    @classmethod
    def _odd_sizes(cls, sizes: list[int]) -> list[int]:
        return _check_kernel_sizes(sizes)

    @field_validator("kernel_probs")
    @classmethod
    def _kernel_probs(cls, probs: dict[str, float]) -> dict[str, float]:
        _check_probs(list(probs.values()), "kernel type probabilities")
        return probs

    @field_validator("resize_probs")
    @classmethod
    def _resize_probs(cls, probs: tuple[float, float, float]) -> tuple[float, float, float]:
        _check_probs(probs, "resize probabilities (up, down, keep)")
        return probs

    @field_validator("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range",
                     "poisson_scale_range", "jpeg_range")
    @classmethod
    def _range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = value
        if low > high:
            raise ValueError(f"empty range: low {low} is above high {high}")
        bounds = {"blur_sigma": "0 < low", "betag_range": "0 < low <= 1 <= high", "betap_range": "0 < low <= 1 <= high",
                  "resize_range": "0 < low <= 1 <= high", "noise_range": "0 <= low",
                  "poisson_scale_range": "0 <= low", "jpeg_range": "1 <= low, high <= 100"}[info.field_name]
        inside = {"blur_sigma": low > 0, "betag_range": 0 < low <= 1 <= high, "betap_range": 0 < low <= 1 <= high,
                  "resize_range": 0 < low <= 1 <= high, "noise_range": low >= 0, "poisson_scale_range": low >= 0,
                  "jpeg_range": 1 <= low and high <= 100}[info.field_name]
        if not inside:
            raise ValueError(f"out of bounds: needs {bounds}, got ({low}, {high})")
        return value

    def kernel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `gan_core.data.blur_kernels.draw_blur_kernels`."""
        return {"kernel_sizes": self.kernel_sizes, "kernel_probs": dict(self.kernel_probs),
                "sigma": self.blur_sigma, "betag": self.betag_range, "betap": self.betap_range,
                "sinc_prob": self.sinc_prob}


def _second_order() -> DegradationOrderSection:
    # Real-ESRGAN's second order: blur_prob 0.8 (second_blur_prob), smaller blur, resize and noise.
    return DegradationOrderSection(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3),
                                   resize_range=(0.3, 1.2), noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


class BlindDegradationSection(_Section):
    """Real-ESRGAN's second-order degradation, made on the training device (gan_core.data.realesrgan).
    The defaults are train_realesrgan_x4plus.yml's."""

    first: DegradationOrderSection = Field(default_factory=DegradationOrderSection)
    second: DegradationOrderSection = Field(default_factory=_second_order)
    final_sinc_prob: float = Field(0.8, ge=0.0, le=1.0)
    final_kernel_sizes: list[int] = Field(default_factory=lambda: list(_REAL_ESRGAN_KERNEL_SIZES))
    sharpen_gt: bool = True  # degrade the USM-sharpened GT, as Real-ESRGAN (its gt_usm)
    pool_size: int = Field(180, ge=0)  # training-pair pool (queue_size); a multiple of data.batch_size; 0: none

    @field_validator("final_kernel_sizes")
    @classmethod
    def _odd_sizes(cls, sizes: list[int]) -> list[int]:
        return _check_kernel_sizes(sizes)

    def degradation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `gan_core.data.realesrgan.SecondOrderDegradation` (besides scale, seed, rank)."""
        return {"first": self.first, "second": self.second, "final_sinc_prob": self.final_sinc_prob,
                "final_kernel_sizes": self.final_kernel_sizes, "sharpen_gt": self.sharpen_gt}
