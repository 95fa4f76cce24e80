"""Degradations that turn a high-resolution image into its low-quality input.

All functions take float tensors in [0, 1] of shape (C, H, W) or (N, C, H, W)
and keep the leading shape. `imresize` is MATLAB's bicubic resize as BasicSR
1.4.2 implements it (`basicsr/utils/matlab_functions.py`), vectorised: the
classic SR benchmarks (Set5, DIV2K bicubic x4) were made with it, so PSNR numbers
are only comparable when LR images come from this exact kernel.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torchvision.io import decode_jpeg, encode_jpeg


def imresize(img: torch.Tensor, scale: float, antialiasing: bool = True) -> torch.Tensor:
    """Resize like MATLAB's imresize(img, scale, 'bicubic'), as BasicSR 1.4.2 does.

    Cubic kernel with a = -0.5; when downscaling with antialiasing the kernel is
    stretched by 1/scale; borders are mirrored (half-sample symmetric). The output
    size is ceil(H * scale) x ceil(W * scale). Rows are resized first, then
    columns, in float32 for float32 input, exactly as BasicSR.

    Args:
        img: float tensor (C, H, W) or (N, C, H, W), nominally in [0, 1].
        scale: the same factor for height and width (0.25 downscales x4).
        antialiasing: widen the kernel when downscaling (MATLAB's default).

    Returns:
        The resized tensor, same dtype and device, not clamped (bicubic
        overshoots slightly outside [0, 1], as in BasicSR).

    Raises:
        ValueError: img is not a 3-D/4-D floating tensor or scale <= 0.
    """
    _check_image(img, "imresize")
    if not scale > 0:
        raise ValueError(f"imresize: scale must be > 0, got {scale}")
    in_h, in_w = img.shape[-2:]
    out_h, out_w = math.ceil(in_h * scale), math.ceil(in_w * scale)
    weights_h, indices_h = _resize_weights(in_h, out_h, float(scale), antialiasing)
    weights_w, indices_w = _resize_weights(in_w, out_w, float(scale), antialiasing)
    rows_done = _resize_rows(img, weights_h, indices_h)  # (..., out_h, W)
    # Columns go through the same row code on the transposed image (contiguous rows are faster).
    cols_done = _resize_rows(rows_done.transpose(-1, -2).contiguous(), weights_w, indices_w)  # (..., out_w, out_h)
    return cols_done.transpose(-1, -2).contiguous()  # (..., out_h, out_w)


def bicubic_downscale(img: torch.Tensor, scale: int) -> torch.Tensor:
    """Downscale by an integer factor: imresize(img, 1 / scale), clamped to [0, 1].

    Args:
        img: float tensor (C, H, W) or (N, C, H, W) in [0, 1].
        scale: the downscaling factor (4 turns 128 px into 32 px).

    Returns:
        The downscaled tensor in [0, 1].
    """
    return imresize(img, 1 / scale).clamp_(0.0, 1.0)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur with a (2 * ceil(3 sigma) + 1)-tap kernel, mirrored borders.

    Args:
        img: float tensor (C, H, W) or (N, C, H, W) in [0, 1].
        sigma: standard deviation in pixels; 0 returns a (clamped) copy.

    Returns:
        The blurred tensor clamped to [0, 1].
    """
    _check_image(img, "gaussian_blur")
    batch = img if img.dim() == 4 else img.unsqueeze(0)
    sigmas = torch.full((batch.shape[0],), float(sigma))
    return _blur_per_image(batch, sigmas).reshape(img.shape)


def add_gaussian_noise(img: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add independent per-pixel, per-channel Gaussian noise.

    Args:
        img: float tensor in [0, 1].
        sigma: noise standard deviation on the 0-255 scale (divided by 255 here).
        generator: torch.Generator for reproducible noise (on img's device).

    Returns:
        The noisy tensor clamped to [0, 1].
    """
    _check_image(img, "add_gaussian_noise")
    noise = torch.randn(img.shape, generator=generator, dtype=img.dtype, device=img.device)
    return (img + noise * (sigma / 255.0)).clamp_(0.0, 1.0)


def add_poisson_noise(img: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add signal-dependent (shot) noise, as Real-ESRGAN's add_poisson_noise.

    The photon count of a pixel is modelled as Poisson(255 * value) (8-bit
    levels), and the noise it implies is multiplied by `scale`.

    Args:
        img: float tensor in [0, 1].
        scale: noise strength; 0 leaves the image unchanged, 1 is plain shot noise.
        generator: torch.Generator for reproducible noise (on img's device).

    Returns:
        The noisy tensor clamped to [0, 1].
    """
    _check_image(img, "add_poisson_noise")
    levels = 255.0
    clean = img.clamp(0.0, 1.0)
    counts = torch.poisson(clean * levels, generator=generator)
    return (clean + (counts / levels - clean) * scale).clamp_(0.0, 1.0)


def jpeg_compress(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip with torchvision (encode_jpeg / decode_jpeg on uint8).

    Args:
        img: float tensor (3, H, W) or (N, 3, H, W) in [0, 1], on any device
            (the codec runs on the CPU).
        quality: JPEG quality 1-100.

    Returns:
        The decoded float tensor in [0, 1], same shape, dtype and device.

    Raises:
        ValueError: quality outside 1-100.
    """
    _check_image(img, "jpeg_compress")
    quality = int(round(quality))
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_compress: quality must be in 1..100, got {quality}")
    batch = img if img.dim() == 4 else img.unsqueeze(0)
    as_uint8 = (batch.detach().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec;
        # they still work, and TorchCodec is not a dependency of this project.
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        decoded = [decode_jpeg(encode_jpeg(one.contiguous(), quality=quality)) for one in as_uint8]
    out = torch.stack(decoded).to(device=img.device, dtype=img.dtype) / 255.0
    return out.reshape(img.shape)


def degrade(
    gt: torch.Tensor,
    scale: int,
    *,
    blur_sigma: tuple[float, float] = (0.0, 0.0),
    noise_sigma: tuple[float, float] = (0.0, 0.0),
    poisson_scale: tuple[float, float] = (0.0, 0.0),
    jpeg_quality: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Make the low-quality input of a ground-truth image: blur -> bicubic downscale -> noise -> JPEG.

    Each parameter is drawn uniformly in its (low, high) range, independently for
    every image of a batch; a (0, 0) range (or jpeg_quality=None) switches that
    step off and draws nothing. Ranges with low == high use that value.

    Args:
        gt: float tensor (C, H, W) or (N, C, H, W) in [0, 1], H and W divisible by scale.
        scale: the downscaling factor.
        blur_sigma: Gaussian blur sigma range in HR pixels.
        noise_sigma: Gaussian noise sigma range on the 0-255 scale.
        poisson_scale: Poisson noise strength range (see add_poisson_noise).
        jpeg_quality: JPEG quality range (integers, inclusive), or None for no JPEG.
        generator: torch.Generator (on gt's device) for every random draw.

    Returns:
        The degraded tensor (…, C, H / scale, W / scale) in [0, 1].

    Raises:
        ValueError: a range is malformed or negative, or gt's size is not divisible by scale.
    """
    _check_image(gt, "degrade")
    if gt.shape[-1] % scale or gt.shape[-2] % scale:
        raise ValueError(f"degrade: image size {tuple(gt.shape[-2:])} is not divisible by scale {scale}")
    batch = gt if gt.dim() == 4 else gt.unsqueeze(0)
    n = batch.shape[0]
    blur = _draw(_check_range("blur_sigma", blur_sigma), n, generator, gt.device)
    noise = _draw(_check_range("noise_sigma", noise_sigma), n, generator, gt.device)
    poisson = _draw(_check_range("poisson_scale", poisson_scale), n, generator, gt.device)
    quality = None
    if jpeg_quality is not None:
        low, high = _check_range("jpeg_quality", jpeg_quality)
        if not 1 <= low <= high <= 100:
            raise ValueError(f"degrade: jpeg_quality must lie in 1..100, got {jpeg_quality}")
        quality = torch.randint(int(low), int(high) + 1, (n,), generator=generator, device=gt.device).tolist()

    if blur is not None:
        batch = _blur_per_image(batch, blur)
    lq = bicubic_downscale(batch, scale)  # whole batch at once: one set of index/weight tensors
    if noise is not None:
        gaussian = torch.randn(lq.shape, generator=generator, dtype=lq.dtype, device=lq.device)
        lq = (lq + gaussian * (noise.view(-1, 1, 1, 1).to(lq.dtype) / 255.0)).clamp_(0.0, 1.0)
    if poisson is not None:
        counts = torch.poisson(lq * 255.0, generator=generator)
        lq = (lq + (counts / 255.0 - lq) * poisson.view(-1, 1, 1, 1).to(lq.dtype)).clamp_(0.0, 1.0)
    if quality is not None:
        lq = torch.stack([jpeg_compress(one, q) for one, q in zip(lq, quality, strict=True)])
    return lq if gt.dim() == 4 else lq.squeeze(0)


DEGRADATION_KEYS = ("blur_sigma", "noise_sigma", "poisson_scale", "jpeg_quality")
"""The keyword arguments of degrade() that a degradation config may set."""


def _check_image(img: torch.Tensor, where: str) -> None:
    if not isinstance(img, torch.Tensor) or img.dim() not in (3, 4) or not img.is_floating_point():
        is_tensor = isinstance(img, torch.Tensor)
        desc = f"{img.dtype} tensor of shape {tuple(img.shape)}" if is_tensor else type(img).__name__
        raise ValueError(f"{where}: expected a float tensor (C, H, W) or (N, C, H, W), got {desc}")


def _check_range(name: str, value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"degrade: {name} must be a (low, high) pair, got {value!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"degrade: {name} must satisfy 0 <= low <= high, got {value!r}")
    return low, high


def _blur_per_image(batch: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur image i of an (N, C, H, W) batch with sigmas[i], in one grouped convolution per axis."""
    n, c, h, w = batch.shape
    sigmas = sigmas.to(device=batch.device, dtype=batch.dtype)
    # Reflect padding needs pad < size: tiny images get a truncated kernel.
    radius = min(math.ceil(3 * float(sigmas.max())), h - 1, w - 1)
    if radius <= 0:
        return batch.clamp(0.0, 1.0)
    own_radius = torch.ceil(3 * sigmas).clamp(max=radius).view(n, 1)
    taps = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device).view(1, -1)
    kernels = torch.exp(-(taps**2) / (2 * sigmas.clamp(min=1e-6).view(n, 1) ** 2))
    kernels = kernels * (taps.abs() <= own_radius)  # each image keeps its own 2 * ceil(3 sigma) + 1 taps
    kernels = kernels / kernels.sum(1, keepdim=True)  # sigma 0 leaves only the centre tap: identity
    kernels = kernels.repeat_interleave(c, dim=0)  # (N * C, 2 * radius + 1): one per plane
    planes = batch.reshape(1, n * c, h, w)
    planes = torch.nn.functional.pad(planes, (radius, radius, radius, radius), mode="reflect")
    planes = torch.nn.functional.conv2d(planes, kernels.view(n * c, 1, 1, -1), groups=n * c)  # along W
    planes = torch.nn.functional.conv2d(planes, kernels.view(n * c, 1, -1, 1), groups=n * c)  # along H
    return planes.reshape(n, c, h, w).clamp_(0.0, 1.0)


def _draw(bounds: tuple[float, float], n: int, generator, device) -> torch.Tensor | None:
    """n uniform draws in [low, high]; None when the range is (0, 0), i.e. the step is off."""
    low, high = bounds
    if high == 0:
        return None
    if low == high:
        return torch.full((n,), low, device=device)
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


# Up to this input length a dense (out, in) resampling matrix and one matmul beat
# gathering the taps (measured on CPU: a 16x3x128x128 batch to 32 px, 2.5 ms vs
# 7 ms); longer inputs would waste time multiplying zeros.
_DENSE_MAX_LENGTH = 256


def _resize_rows(img: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Resize along dim -2: out[..., i, :] = sum_k weights[i, k] * img[..., indices[i, k], :]."""
    weights = weights.to(device=img.device, dtype=img.dtype)
    indices = indices.to(device=img.device)
    in_length = img.shape[-2]
    if in_length <= _DENSE_MAX_LENGTH:
        matrix = torch.zeros(weights.shape[0], in_length, dtype=img.dtype, device=img.device)
        matrix.scatter_add_(1, indices, weights)  # mirrored taps may hit the same pixel twice
        return matrix @ img
    # A loop over the kernel taps (4 to ~20), each step vectorised over the image;
    # gathering whole rows (dim -2) keeps the copies contiguous.
    out = img.index_select(-2, indices[:, 0]) * weights[:, 0, None]
    for k in range(1, weights.shape[1]):
        out += img.index_select(-2, indices[:, k]) * weights[:, k, None]
    return out


@functools.lru_cache(maxsize=256)
def _resize_weights(in_length: int, out_length: int, scale: float, antialiasing: bool):
    """Weights (out, K) and 0-based source indices (out, K), BasicSR's calculate_weights_indices.

    The arithmetic (float32, the same operations in the same order) follows BasicSR
    1.4.2 so the weights are bit-identical; its symmetric padding is replaced by
    mirroring the indices into the image, which selects the same pixels.
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        kernel_width = kernel_width / scale
    x = torch.linspace(1, out_length, out_length)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centres in input space (1-based)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left.view(out_length, 1).expand(out_length, taps) + torch.linspace(0, taps - 1, taps).view(1, taps)
    distance = u.view(out_length, 1).expand(out_length, taps) - indices
    if scale < 1 and antialiasing:
        weights = scale * _cubic(distance * scale)
    else:
        weights = _cubic(distance)
    weights = weights / torch.sum(weights, 1).view(out_length, 1)
    # BasicSR drops the first / last tap column when any of its weights is zero.
    zeros_per_column = torch.sum(weights == 0, 0)
    if zeros_per_column[0] != 0:
        indices, weights = indices[:, 1:], weights[:, 1:]
    if zeros_per_column[-1] != 0:
        indices, weights = indices[:, :-1], weights[:, :-1]
    return weights.contiguous(), _mirror(indices.long() - 1, in_length).contiguous()


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    absx = torch.abs(x)
    absx2 = absx**2
    absx3 = absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * ((absx <= 1).type_as(absx)) + (
        -0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2
    ) * (((absx > 1) * (absx <= 2)).type_as(absx))


def _mirror(index: torch.Tensor, length: int) -> torch.Tensor:
    """Half-sample symmetric reflection of 0-based indices into [0, length): -1 -> 0, length -> length - 1."""
    period = 2 * length
    index = torch.remainder(index, period)
    return torch.where(index >= length, period - 1 - index, index)
