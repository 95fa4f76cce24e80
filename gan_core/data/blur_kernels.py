"""Real-ESRGAN's blur kernels, built in batches with torch: Gaussian (isotropic, anisotropic),
generalized Gaussian, plateau and the 2D sinc (ringing) filter, plus the per-image sampler of
Real-ESRGAN's dataset (kernel size, sinc or mixed kernel, its type and shape parameters).

For the same parameters every kernel equals BasicSR 1.4.2's (`basicsr/data/degradations.py`) to
float64 rounding; tests/gan_core/test_realesrgan_golden.py checks it against the sdist. The
differences are where randomness comes from: every draw here comes from a torch.Generator we seed
(BasicSR draws from the global `random` / `np.random`), in one fixed order per batch, so a saved
generator state reproduces the kernels exactly.

Shapes: n kernels of one batch are built at once on a common (pad_to, pad_to) grid; a kernel of
size k < pad_to is zero outside its central k x k square, which is what BasicSR's `np.pad` of each
kernel to 21 gives.
"""

from __future__ import annotations

import math

import scipy.special
import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
"""Real-ESRGAN's names of the mixed kernel types (`kernel_list`)."""

_GAUSSIAN, _GENERALIZED, _PLATEAU = 0, 1, 2
_FAMILY = {"iso": _GAUSSIAN, "aniso": _GAUSSIAN, "generalized_iso": _GENERALIZED, "generalized_aniso": _GENERALIZED,
           "plateau_iso": _PLATEAU, "plateau_aniso": _PLATEAU}


def _grid(pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xx (column offset) and yy (row offset) of a (pad_to, pad_to) grid centred at 0, float64 (BasicSR's
    mesh_grid)."""
    axis = torch.arange(-(pad_to // 2), pad_to // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return xx, yy


def _as_batch(value, n: int) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1).expand(n)


def _inside(sizes: torch.Tensor, pad_to: int) -> torch.Tensor:
    """(n, pad_to, pad_to) mask of each kernel's own central sizes[i] x sizes[i] square."""
    xx, yy = _grid(pad_to)
    radius = (sizes.to(torch.float64) // 2).view(-1, 1, 1)
    return (xx.abs() <= radius) & (yy.abs() <= radius)


def _normalised(kernels: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    kernels = torch.where(inside, kernels, torch.zeros_like(kernels))
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def quadratic_form(sigma_x, sigma_y, theta, pad_to: int) -> torch.Tensor:
    """(n, pad_to, pad_to): [x y] Sigma^-1 [x y]^T with Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T,
    the exponent of BasicSR's pdf2 (times -2)."""
    sigma_x = torch.as_tensor(sigma_x, dtype=torch.float64).reshape(-1)
    n = sigma_x.numel()
    inv_x, inv_y = 1.0 / sigma_x**2, 1.0 / _as_batch(sigma_y, n) ** 2
    cos, sin = torch.cos(_as_batch(theta, n)), torch.sin(_as_batch(theta, n))
    # Sigma^-1 = R diag(1/sx^2, 1/sy^2) R^T = [[a, b], [b, d]]
    a = (cos**2 * inv_x + sin**2 * inv_y).view(-1, 1, 1)
    b = (cos * sin * (inv_x - inv_y)).view(-1, 1, 1)
    d = (sin**2 * inv_x + cos**2 * inv_y).view(-1, 1, 1)
    xx, yy = _grid(pad_to)
    return a * xx**2 + 2 * b * xx * yy + d * yy**2


def mixed_kernels(family, sizes, sigma_x, sigma_y, theta, beta, pad_to: int) -> torch.Tensor:
    """Normalised Gaussian / generalized Gaussian / plateau kernels, one per row of the parameters.

    Args:
        family: (n,) 0 Gaussian exp(-q/2), 1 generalized Gaussian exp(-q^beta / 2), 2 plateau 1 / (1 + q^beta),
            where q is `quadratic_form`. Isotropic kernels are sigma_y = sigma_x, theta = 0.
        sizes: (n,) odd kernel sizes <= pad_to.
        sigma_x, sigma_y, theta, beta: (n,) shape parameters (beta unused by the Gaussian).
        pad_to: side of the returned kernels.

    Returns:
        float64 (n, pad_to, pad_to), each summing to 1, zero outside its own size.
    """
    family = torch.as_tensor(family).reshape(-1)
    n = family.numel()
    q = quadratic_form(_as_batch(sigma_x, n), sigma_y, theta, pad_to)
    q_beta = q ** _as_batch(beta, n).view(-1, 1, 1)
    kernels = torch.where((family == _GAUSSIAN).view(-1, 1, 1), torch.exp(-0.5 * q),
                          torch.where((family == _GENERALIZED).view(-1, 1, 1), torch.exp(-0.5 * q_beta),
                                      1.0 / (q_beta + 1.0)))
    return _normalised(kernels, _inside(torch.as_tensor(sizes).reshape(-1).expand(n), pad_to))


def bivariate_gaussian(kernel_size: int, sigma_x: float, sigma_y: float, theta: float,
                       isotropic: bool = True) -> torch.Tensor:
    """One (kernel_size, kernel_size) Gaussian kernel (BasicSR's bivariate_Gaussian); float64."""
    sigma_y, theta = (sigma_x, 0.0) if isotropic else (sigma_y, theta)
    return mixed_kernels([_GAUSSIAN], [kernel_size], sigma_x, sigma_y, theta, 1.0, kernel_size)[0]


def bivariate_generalized_gaussian(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float,
                                   isotropic: bool = True) -> torch.Tensor:
    """One generalized Gaussian kernel (BasicSR's bivariate_generalized_Gaussian); float64."""
    sigma_y, theta = (sigma_x, 0.0) if isotropic else (sigma_y, theta)
    return mixed_kernels([_GENERALIZED], [kernel_size], sigma_x, sigma_y, theta, beta, kernel_size)[0]


def bivariate_plateau(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float,
                      isotropic: bool = True) -> torch.Tensor:
    """One plateau kernel 1 / (1 + q^beta) (BasicSR's bivariate_plateau); float64."""
    sigma_y, theta = (sigma_x, 0.0) if isotropic else (sigma_y, theta)
    return mixed_kernels([_PLATEAU], [kernel_size], sigma_x, sigma_y, theta, beta, kernel_size)[0]


def sinc_kernels(cutoff, sizes, pad_to: int) -> torch.Tensor:
    """Circularly symmetric low-pass (2D sinc) kernels, BasicSR's circular_lowpass_kernel.

    Args:
        cutoff: (n,) cutoff frequencies in radians (pi is the Nyquist frequency).
        sizes: (n,) odd kernel sizes <= pad_to.
        pad_to: side of the returned kernels (zero padding around each kernel).

    Returns:
        float64 (n, pad_to, pad_to), each summing to 1.
    """
    cutoff = torch.as_tensor(cutoff, dtype=torch.float64).reshape(-1, 1, 1)
    xx, yy = _grid(pad_to)
    radius = torch.sqrt(xx**2 + yy**2)
    at_centre = radius == 0
    safe = torch.where(at_centre, torch.ones_like(radius), radius)
    # scipy's J1 (scikit-image depends on scipy): torch.special.bessel_j1 is off by up to ~3e-7 relative
    bessel = torch.from_numpy(scipy.special.j1((cutoff * safe).numpy()))
    kernels = cutoff * bessel / (2 * math.pi * safe)
    kernels = torch.where(at_centre, cutoff**2 / (4 * math.pi), kernels)  # the limit at r = 0
    sizes = torch.as_tensor(sizes).reshape(-1).expand(cutoff.shape[0])
    return _normalised(kernels, _inside(sizes, pad_to))


def circular_lowpass_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> torch.Tensor:
    """One 2D sinc kernel, zero-padded to pad_to when that is larger (BasicSR's circular_lowpass_kernel)."""
    return sinc_kernels([cutoff], [kernel_size], max(kernel_size, pad_to))[0]


def pulse_kernels(n: int, pad_to: int) -> torch.Tensor:
    """(n, pad_to, pad_to) identity kernels: filtering with them changes nothing."""
    kernels = torch.zeros(n, pad_to, pad_to, dtype=torch.float64)
    kernels[:, pad_to // 2, pad_to // 2] = 1.0
    return kernels


def draw_blur_kernels(n: int, generator: torch.Generator, *, kernel_sizes: list[int], kernel_probs: dict[str, float],
                      sigma: tuple[float, float], betag: tuple[float, float], betap: tuple[float, float],
                      sinc_prob: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One blur kernel per image, as Real-ESRGAN's dataset draws `kernel1` / `kernel2`.

    Per image: a size from kernel_sizes; with probability sinc_prob a sinc kernel with cutoff uniform in
    [pi/3, pi] (sizes < 13) or [pi/5, pi]; else a mixed kernel whose type is drawn with kernel_probs, sigmas
    uniform in `sigma`, rotation uniform in [-pi, pi], and beta uniform in [low, 1] or [1, high] with
    probability 1/2 each (betag for generalized Gaussians, betap for plateaus). Isotropic kernels use
    sigma_y = sigma_x and no rotation. Everything is drawn for every image, in a fixed order, whether used
    or not, so the draws of a batch do not depend on its content.

    Args:
        n: how many kernels.
        generator: CPU torch.Generator for every draw.
        kernel_sizes: odd sizes to choose from uniformly; the kernels are padded to the largest.
        kernel_probs: probability of each type of KERNEL_TYPES (missing types: 0).

    Returns:
        (float64 kernels (n, K, K) with K = max(kernel_sizes), the drawn parameters by name).
    """
    pad_to = max(kernel_sizes)
    size_choices = torch.tensor(kernel_sizes)
    sizes = size_choices[torch.randint(len(kernel_sizes), (n,), generator=generator)]
    is_sinc = torch.rand(n, generator=generator, dtype=torch.float64) < sinc_prob
    low_cutoff = torch.where(sizes < 13, math.pi / 3, math.pi / 5).to(torch.float64)
    cutoff = low_cutoff + (math.pi - low_cutoff) * torch.rand(n, generator=generator, dtype=torch.float64)
    weights = torch.tensor([float(kernel_probs.get(name, 0.0)) for name in KERNEL_TYPES], dtype=torch.float64)
    types = torch.multinomial(weights, n, replacement=True, generator=generator)
    uniforms = torch.rand(5, n, generator=generator, dtype=torch.float64)
    sigma_x = sigma[0] + (sigma[1] - sigma[0]) * uniforms[0]
    sigma_y = sigma[0] + (sigma[1] - sigma[0]) * uniforms[1]
    theta = -math.pi + 2 * math.pi * uniforms[2]
    isotropic = torch.tensor([name.endswith("iso") and not name.endswith("aniso") for name in KERNEL_TYPES])[types]
    sigma_y = torch.where(isotropic, sigma_x, sigma_y)
    theta = torch.where(isotropic, torch.zeros_like(theta), theta)
    family = torch.tensor([_FAMILY[name] for name in KERNEL_TYPES])[types]
    beta_low = torch.where(family == _PLATEAU, betap[0], betag[0]).to(torch.float64)
    beta_high = torch.where(family == _PLATEAU, betap[1], betag[1]).to(torch.float64)
    below_one = uniforms[3] < 0.5
    beta = torch.where(below_one, beta_low + (1 - beta_low) * uniforms[4], 1 + (beta_high - 1) * uniforms[4])
    kernels = torch.where(is_sinc.view(-1, 1, 1), sinc_kernels(cutoff, sizes, pad_to),
                          mixed_kernels(family, sizes, sigma_x, sigma_y, theta, beta, pad_to))
    params = {"size": sizes, "is_sinc": is_sinc, "cutoff": cutoff, "type": types, "sigma_x": sigma_x,
              "sigma_y": sigma_y, "theta": theta, "beta": beta}
    return kernels, params


def draw_final_sinc_kernels(n: int, generator: torch.Generator, *, kernel_sizes: list[int],
                            prob: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real-ESRGAN's final sinc filter per image: with probability prob a sinc kernel of a random size with
    cutoff uniform in [pi/3, pi], else the identity; padded to max(kernel_sizes)."""
    pad_to = max(kernel_sizes)
    apply = torch.rand(n, generator=generator, dtype=torch.float64) < prob
    sizes = torch.tensor(kernel_sizes)[torch.randint(len(kernel_sizes), (n,), generator=generator)]
    cutoff = math.pi / 3 + (2 * math.pi / 3) * torch.rand(n, generator=generator, dtype=torch.float64)
    kernels = torch.where(apply.view(-1, 1, 1), sinc_kernels(cutoff, sizes, pad_to), pulse_kernels(n, pad_to))
    return kernels, {"apply": apply, "size": sizes, "cutoff": cutoff}
