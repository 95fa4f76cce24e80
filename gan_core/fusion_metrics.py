"""No-reference metrics of infrared + visible image fusion: EN, SD, SF, MI, Q^AB/F.

All functions take uint8 gray images, (H, W) or (H, W, 1); colour images are
refused (convert them to gray first, the way your benchmark does). `a` and `b`
are the two source images (infrared and visible, in either order: every metric
here is symmetric in them), `f` the fused image.

The definitions follow the MATLAB code of the VIFB benchmark (Zhang, Ye & Xiao,
CVPRW 2020, `metrics/metrics*.m`), a common reference for infrared/visible
fusion papers, except on two points:

- SF is the mean over the pixel differences that exist (VIFB divides the sums
  by H*W; the `Evaluator` class copied across recent Python fusion repos uses
  the mean, as here).
- MI is in bits on the raw 256 grey levels (VIFB min-max rescales each image
  and uses natural logs; that `Evaluator`, via sklearn's `mutual_info_score`,
  also reports nats: multiply ours by ln 2 to compare).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import convolve2d

# Q^AB/F constants of Xydeas & Petrovic (2000), as in the MATLAB reference.
QABF_GAMMA_G = 0.9994
QABF_KAPPA_G = -15.0
QABF_SIGMA_G = 0.5
QABF_GAMMA_A = 0.9879
QABF_KAPPA_A = -22.0
QABF_SIGMA_A = 0.8
QABF_L = 1.0

# Sobel kernels of the reference (`h3` for x, `h1` for y), applied with a true
# 2-D convolution (MATLAB `conv2`); the flip only changes the signs of gx and gy
# together, which neither the strength nor atan(gy / gx) sees.
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)


def _gray(img: np.ndarray, name: str) -> np.ndarray:
    """Check a uint8 (H, W) or (H, W, 1) image and return it as (H, W) uint8."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"{name} must be a gray (H, W) or (H, W, 1) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (grey levels 0..255), got dtype {img.dtype}")
    if img.size == 0:
        raise ValueError(f"{name} is empty (shape {img.shape})")
    return img


def _same_shape(**images: np.ndarray) -> list[np.ndarray]:
    """Check and squeeze several images, which must share one (H, W)."""
    grays = [_gray(img, name) for name, img in images.items()]
    shapes = {name: g.shape for name, g in zip(images, grays)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"images must have the same (H, W), got {shapes}")
    return grays


def _entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a histogram (any shape); empty bins add nothing."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy(f: np.ndarray) -> float:
    """EN: Shannon entropy of the grey-level histogram, in bits.

    EN = -sum_{l=0}^{255} p_l log2 p_l, with p_l the fraction of pixels at
    grey level l (terms with p_l = 0 left out).

    Reference: J. W. Roberts, J. A. van Aardt and F. B. Ahmed, "Assessment of
    image fusion procedures using entropy, image quality, and multispectral
    classification", J. Appl. Remote Sens. 2(1), 023522 (2008).

    Args:
        f: uint8 (H, W) or (H, W, 1) image.

    Returns:
        EN in [0, 8] bits.

    Raises:
        ValueError: `f` is not a non-empty uint8 gray image.
    """
    f = _gray(f, "f")
    return _entropy_bits(np.bincount(f.ravel(), minlength=256))


def standard_deviation(f: np.ndarray) -> float:
    """SD: population standard deviation of the grey levels (0..255 scale).

    SD = sqrt( 1/(H W) sum_{i,j} (f_ij - mu)^2 ), mu the mean grey level:
    ddof = 0, as VIFB's `metricsVariance.m` (which, despite its name, returns
    this SD) and numpy's default.

    Args:
        f: uint8 (H, W) or (H, W, 1) image.

    Returns:
        SD in [0, 127.5].

    Raises:
        ValueError: `f` is not a non-empty uint8 gray image.
    """
    f = _gray(f, "f")
    return float(np.std(f.astype(np.float64)))


def spatial_frequency(f: np.ndarray) -> float:
    """SF: spatial frequency, the RMS of the horizontal and vertical differences.

    SF = sqrt(RF^2 + CF^2), with
    RF^2 = 1/(H (W-1)) sum_{i=1..H} sum_{j=2..W} (f_ij - f_i,j-1)^2   (row frequency)
    CF^2 = 1/((H-1) W) sum_{i=2..H} sum_{j=1..W} (f_ij - f_i-1,j)^2   (column frequency)
    i.e. each term is the mean over the differences that exist. VIFB divides
    both sums by H*W instead, which gives slightly smaller values on small
    images (the two agree as H, W grow).

    Reference: A. M. Eskicioglu and P. S. Fisher, "Image quality measures and
    their performance", IEEE Trans. Commun. 43(12), 2959-2965 (1995).

    Args:
        f: uint8 (H, W) or (H, W, 1) image, at least 2 x 2.

    Returns:
        SF in grey levels per pixel, >= 0.

    Raises:
        ValueError: `f` is not a uint8 gray image of at least 2 x 2 pixels.
    """
    f = _gray(f, "f")
    if min(f.shape) < 2:
        raise ValueError(f"spatial_frequency needs at least 2 x 2 pixels, got shape {f.shape}")
    f = f.astype(np.float64)
    row_freq_sq = np.mean((f[:, 1:] - f[:, :-1]) ** 2)
    col_freq_sq = np.mean((f[1:, :] - f[:-1, :]) ** 2)
    return float(np.sqrt(row_freq_sq + col_freq_sq))


def _mutual_information_pair(x: np.ndarray, y: np.ndarray) -> float:
    """MI(x, y) = H(x) + H(y) - H(x, y) in bits, from the 256 x 256 joint histogram."""
    joint = np.bincount(x.ravel().astype(np.int64) * 256 + y.ravel(), minlength=256 * 256).reshape(256, 256)
    return _entropy_bits(joint.sum(axis=1)) + _entropy_bits(joint.sum(axis=0)) - _entropy_bits(joint)


def mutual_information(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """MI: information the fused image shares with each source, summed.

    MI = MI(a, f) + MI(b, f), with
    MI(x, f) = sum_{u,v} p_xf(u, v) log2( p_xf(u, v) / (p_x(u) p_f(v)) )
             = H(x) + H(f) - H(x, f),
    p_xf the normalised 256 x 256 joint histogram of grey levels and p_x, p_f
    its marginals. In bits; no rescaling of the grey levels.

    Reference: G. Qu, D. Zhang and P. Yan, "Information measure for performance
    of image fusion", Electronics Letters 38(7), 313-315 (2002).

    Args:
        a: Source image, uint8 (H, W) or (H, W, 1).
        b: Other source image, same shape.
        f: Fused image, same shape.

    Returns:
        MI in bits, in [0, 16] (each term is at most 8 bits).

    Raises:
        ValueError: An image is not a non-empty uint8 gray image, or the
            shapes differ.
    """
    a, b, f = _same_shape(a=a, b=b, f=f)
    return _mutual_information_pair(a, f) + _mutual_information_pair(b, f)


def _sobel_strength_orientation(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength g and orientation alpha of the MATLAB reference, float64 (H, W) each.

    conv2(..., 'same') pads with zeros, so the image border is an edge unless
    the image is 0 there. alpha = atan(gy / gx) in (-pi/2, pi/2], set to pi/2
    where gx == 0: an edge's polarity is ignored.
    """
    img = img.astype(np.float64)
    gx = convolve2d(img, SOBEL_X, mode="same")
    gy = convolve2d(img, SOBEL_Y, mode="same")
    strength = np.sqrt(gx**2 + gy**2)
    ratio = np.divide(gy, gx, out=np.zeros_like(gy), where=gx != 0)
    orientation = np.where(gx == 0, np.pi / 2, np.arctan(ratio))
    return strength, orientation


def _edge_preservation(
    strength_src: np.ndarray,
    orientation_src: np.ndarray,
    strength_fused: np.ndarray,
    orientation_fused: np.ndarray,
) -> np.ndarray:
    """Q^XF per pixel: how well the fused image keeps the source's edge strength and orientation."""
    # Relative strength: the smaller over the larger. Where the two are equal the
    # reference stores g^F itself, not 1; on uint8 input a nonzero g is >= 1, so
    # this only moves Q_g up the flat top of its sigmoid (by < 6e-4).
    safe_src = np.where(strength_src == 0, 1.0, strength_src)
    safe_fused = np.where(strength_fused == 0, 1.0, strength_fused)
    relative_strength = np.where(
        strength_src > strength_fused,
        strength_fused / safe_src,
        np.where(strength_src == strength_fused, strength_fused, strength_src / safe_fused),
    )
    relative_orientation = 1 - np.abs(orientation_src - orientation_fused) / (np.pi / 2)
    strength_kept = QABF_GAMMA_G / (1 + np.exp(QABF_KAPPA_G * (relative_strength - QABF_SIGMA_G)))
    orientation_kept = QABF_GAMMA_A / (1 + np.exp(QABF_KAPPA_A * (relative_orientation - QABF_SIGMA_A)))
    return strength_kept * orientation_kept


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Q^AB/F: edge information transferred from the sources to the fused image.

    Per image X, Sobel responses gx, gy (zero padding) give the edge strength
    g = sqrt(gx^2 + gy^2) and orientation alpha = atan(gy / gx) (pi/2 where
    gx = 0). For a source X in {A, B} against the fused F, per pixel:
        G^XF = g^F / g^X if g^X > g^F, g^X / g^F if g^X < g^F, g^F if equal
        A^XF = 1 - |alpha^X - alpha^F| / (pi/2)
        Q^XF = Gamma_g / (1 + exp(kappa_g (G^XF - sigma_g)))
             * Gamma_a / (1 + exp(kappa_a (A^XF - sigma_a)))
    with Gamma_g = 0.9994, kappa_g = -15, sigma_g = 0.5, Gamma_a = 0.9879,
    kappa_a = -22, sigma_a = 0.8, and
        Q^AB/F = sum(Q^AF w^A + Q^BF w^B) / sum(w^A + w^B),   w^X = (g^X)^L, L = 1.

    Reference: C. S. Xydeas and V. Petrovic, "Objective image fusion
    performance measure", Electronics Letters 36(4), 308-309 (2000). The
    conventions (zero-padded `conv2` Sobel, atan with the gx = 0 case, the
    ratio swap and its g^F-when-equal branch, these constants) follow the
    MATLAB `analysis_Qabf.m` (R. Hong, 2007) as shipped in VIFB as
    `metrics/metricsQabf.m`, which the Python `Evaluator.Qabf` copied across
    recent fusion repos also transcribes (checked against a loop-by-loop
    transcription in the tests). With these constants a perfect copy
    scores about Gamma_g * Gamma_a / (1 + exp(-4.4)) = 0.975, not 1.

    Args:
        a: Source image, uint8 (H, W) or (H, W, 1).
        b: Other source image, same shape.
        f: Fused image, same shape.

    Returns:
        Q^AB/F, in [0, 0.976]; nan when neither source has any edge (both
        all zero), as in the reference (0 / 0).

    Raises:
        ValueError: An image is not a non-empty uint8 gray image, or the
            shapes differ.
    """
    a, b, f = _same_shape(a=a, b=b, f=f)
    strength_a, orientation_a = _sobel_strength_orientation(a)
    strength_b, orientation_b = _sobel_strength_orientation(b)
    strength_f, orientation_f = _sobel_strength_orientation(f)
    kept_a = _edge_preservation(strength_a, orientation_a, strength_f, orientation_f)
    kept_b = _edge_preservation(strength_b, orientation_b, strength_f, orientation_f)
    weight_a, weight_b = strength_a**QABF_L, strength_b**QABF_L
    total_weight = np.sum(weight_a + weight_b)
    if total_weight == 0:
        return float("nan")
    return float(np.sum(kept_a * weight_a + kept_b * weight_b) / total_weight)


def fusion_metrics(ir: np.ndarray, vi: np.ndarray, fused: np.ndarray) -> dict[str, float]:
    """The five usual no-reference fusion metrics of one (ir, vi, fused) triple.

    Args:
        ir: Infrared image, uint8 (H, W) or (H, W, 1).
        vi: Visible image as gray, same shape.
        fused: Fused image as gray, same shape.

    Returns:
        {"en", "sd", "sf"} of the fused image, {"mi", "qabf"} of the triple;
        see the functions of the same names.

    Raises:
        ValueError: An image is not a uint8 gray image, or the shapes differ.
    """
    ir, vi, fused = _same_shape(ir=ir, vi=vi, fused=fused)
    return {
        "en": entropy(fused),
        "sd": standard_deviation(fused),
        "sf": spatial_frequency(fused),
        "mi": mutual_information(ir, vi, fused),
        "qabf": qabf(ir, vi, fused),
    }
