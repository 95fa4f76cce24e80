"""Fusion metrics against values worked out by hand on tiny images.

Sobel convention used in the Q^AB/F comments (zero padding, correlation form;
MATLAB's conv2 flips both kernels, which negates gx and gy together and
changes neither g nor atan(gy / gx)):
    gx = right column - left column, weights (1, 2, 1)
    gy = top row - bottom row,       weights (1, 2, 1)
A 2x2 constant image of value v, padded with zeros, then has at every pixel
|gx| = |gy| = 2v + v = 3v, so g = 3*sqrt(2)*v; the signs give orientation
atan(gy / gx) = -pi/4 at (0, 0) and (1, 1), +pi/4 at (0, 1) and (1, 0).
"""

import math

import numpy as np
import pytest

from gan_core.fusion_metrics import (
    entropy,
    fusion_metrics,
    mutual_information,
    qabf,
    spatial_frequency,
    standard_deviation,
)


def u8(rows):
    return np.array(rows, dtype=np.uint8)


def strength_kept(relative_strength):
    return 0.9994 / (1 + math.exp(-15 * (relative_strength - 0.5)))


def orientation_kept(relative_orientation):
    return 0.9879 / (1 + math.exp(-22 * (relative_orientation - 0.8)))


# Best score of a perfectly kept edge with g >= 1: G^XF = g (the reference's
# tie branch) puts Q_g on its plateau 0.9994, A^XF = 1 gives 0.9879 / (1 + e^-4.4).
PERFECT_COPY = 0.9994 * orientation_kept(1.0)  # 0.97533


def random_triple(seed=0, size=(16, 20)):
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, size, dtype=np.uint8) for _ in range(3))


# --- EN ----------------------------------------------------------------------


def test_entropy_by_hand():
    # two levels, half the pixels each: -2 * (1/2 * log2 1/2) = 1 bit
    assert entropy(u8([[0, 0], [255, 255]])) == pytest.approx(1.0)
    # four levels, a quarter each: log2 4 = 2 bits
    assert entropy(u8([[0, 1], [2, 3]])) == pytest.approx(2.0)
    # 3/4 and 1/4: -(3/4 log2 3/4 + 1/4 log2 1/4) = 0.311278 + 0.5 = 0.811278
    assert entropy(u8([[7, 7], [7, 200]])) == pytest.approx(0.8112781245)
    # 9 distinct levels in a 3x3: log2 9 = 3.169925
    assert entropy(u8([[0, 1, 2], [3, 4, 5], [6, 7, 8]])) == pytest.approx(math.log2(9))
    # one level: 0 bits
    assert entropy(np.full((4, 4), 42, np.uint8)) == 0.0


def test_entropy_accepts_trailing_channel_of_one():
    img = u8([[0, 0], [255, 255]])
    assert entropy(img[..., None]) == entropy(img)


# --- SD ----------------------------------------------------------------------


def test_standard_deviation_by_hand():
    # mean 127.5, every pixel 127.5 away: SD = 127.5
    assert standard_deviation(u8([[0, 0], [255, 255]])) == pytest.approx(127.5)
    # one 9 among eight 0s: mean 1, variance (8 * 1^2 + 8^2) / 9 = 72 / 9 = 8 (ddof 0)
    assert standard_deviation(u8([[0, 0, 0], [0, 9, 0], [0, 0, 0]])) == pytest.approx(math.sqrt(8))
    assert standard_deviation(np.full((3, 5), 200, np.uint8)) == 0.0


# --- SF ----------------------------------------------------------------------


def test_spatial_frequency_by_hand():
    # rows [0, 0] and [255, 255]: horizontal differences 0, 0 -> RF = 0;
    # vertical differences 255, 255 -> CF^2 = 255^2 -> SF = 255
    assert spatial_frequency(u8([[0, 0], [255, 255]])) == pytest.approx(255.0)
    # 3x3 ramp 0..8 row by row: the 3x2 = 6 horizontal differences are all 1 -> RF^2 = 1;
    # the 2x3 = 6 vertical differences are all 3 -> CF^2 = 9; SF = sqrt(10).
    # (VIFB's H*W normalisation would give sqrt(6/9 + 54/9) = sqrt(60/9) instead.)
    assert spatial_frequency(u8([[0, 1, 2], [3, 4, 5], [6, 7, 8]])) == pytest.approx(math.sqrt(10))
    # 2x4 checkerboard of 0 / 10: all 6 horizontal and all 4 vertical differences are 10;
    # RF^2 = CF^2 = 100 -> SF = sqrt(200)
    assert spatial_frequency(u8([[0, 10, 0, 10], [10, 0, 10, 0]])) == pytest.approx(math.sqrt(200))
    assert spatial_frequency(np.full((4, 4), 9, np.uint8)) == 0.0


def test_spatial_frequency_needs_two_by_two():
    with pytest.raises(ValueError, match="at least 2 x 2"):
        spatial_frequency(u8([[1, 2, 3]]))


# --- MI ----------------------------------------------------------------------


def test_mutual_information_by_hand():
    halves = u8([[0, 0], [255, 255]])  # H = 1 bit
    stripes = u8([[0, 255], [0, 255]])  # H = 1 bit, independent of `halves`
    # identical images: MI(x, x) = H(x), so MI = 2 H = 2 bits
    assert mutual_information(halves, halves, halves) == pytest.approx(2.0)
    # halves vs stripes: each of the 4 joint cells holds 1/4 -> H(a, f) = 2 = H(a) + H(f), MI = 0;
    # with b = f the second term is H(f) = 1
    assert mutual_information(halves, stripes, stripes) == pytest.approx(1.0)
    assert mutual_information(halves, halves, stripes) == pytest.approx(0.0, abs=1e-12)
    # a constant source shares nothing: H(x) = 0 and H(x, f) = H(f)
    flat = np.full((2, 2), 3, np.uint8)
    assert mutual_information(flat, flat, halves) == pytest.approx(0.0, abs=1e-12)
    # 3/4 vs 1/4 image against itself: 2 * 0.811278 bits
    skewed = u8([[7, 7], [7, 200]])
    assert mutual_information(skewed, skewed, skewed) == pytest.approx(2 * 0.8112781245)


def test_mutual_information_is_symmetric_and_blind_to_relabelling():
    a, b, f = random_triple()
    assert mutual_information(a, b, f) == pytest.approx(mutual_information(b, a, f))
    # MI depends on the joint histogram only up to a permutation of grey levels
    assert mutual_information(a, b, 255 - f) == pytest.approx(mutual_information(a, b, f))
    assert mutual_information(a, a, a) == pytest.approx(2 * entropy(a))


# --- Q^AB/F ------------------------------------------------------------------


def test_qabf_perfect_copy_by_hand():
    one = np.ones((2, 2), np.uint8)
    # a = b = f: g^X = g^F = 3 sqrt(2) > 1 at every pixel, so G^XF = g^F (tie branch) and
    # Q_g = 0.9994 / (1 + e^(-15 (4.24 - 0.5))) = 0.9994 to 1e-24; A^XF = 1 -> Q_a = 0.9879 / (1 + e^-4.4)
    assert qabf(one, one, one) == pytest.approx(PERFECT_COPY, rel=1e-12)
    assert PERFECT_COPY == pytest.approx(0.975333, abs=1e-6)


def test_qabf_strength_ratio_is_swapped_by_hand():
    zero, one, two = (np.full((2, 2), v, np.uint8) for v in (0, 1, 2))
    # b = 0 has g = 0, so weight 0: only A counts. g^A = 3 sqrt(2), g^F = 6 sqrt(2), same
    # orientations: G^AF = g^A / g^F = 0.5 -> Q_g = 0.9994 / (1 + e^0) = 0.4997; A^AF = 1.
    expected = 0.4997 * orientation_kept(1.0)  # 0.487666
    assert qabf(one, zero, two) == pytest.approx(expected, rel=1e-12)
    # the fused edge weaker than the source's: g^F / g^A = 0.5, the same score
    assert qabf(two, zero, one) == pytest.approx(expected, rel=1e-12)


def test_qabf_black_fused_image_is_zero_by_hand():
    one = np.ones((2, 2), np.uint8)
    black = np.zeros((2, 2), np.uint8)
    # g^F = 0 and alpha^F = pi/2 (gx = 0) everywhere; G^XF = 0 / g^X = 0 -> Q_g = 0.9994 / (1 + e^7.5).
    # alpha^A = +pi/4 at two pixels -> A = 1 - (pi/4) / (pi/2) = 0.5, and -pi/4 at two -> A = -0.5.
    # All weights are equal (3 sqrt(2)), for A and B alike: Q = Q_g(0) * (Q_a(0.5) + Q_a(-0.5)) / 2
    expected = strength_kept(0.0) * (orientation_kept(0.5) + orientation_kept(-0.5)) / 2
    assert qabf(one, one, black) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(3.7071e-7, rel=1e-4)


def test_qabf_orientation_uses_atan_with_vertical_gradient_as_half_pi():
    # 3x1 columns: zero padding left and right makes gx = 0 everywhere, so alpha = pi/2.
    # a = [0, 0, 9]: gy at the middle row = 2*0 - 2*9 = -18; f = [9, 0, 0]: gy = 2*9 - 2*0 = +18.
    # Both get alpha = pi/2 (not -pi/2 / +pi/2 as atan2 or a bare atan(-inf) would say), and
    # g^A = g^F = 18: a polarity-flipped copy keeps its edge perfectly.
    a = u8([[0], [0], [9]])
    f = u8([[9], [0], [0]])
    assert qabf(a, a, f) == pytest.approx(PERFECT_COPY, rel=1e-12)


def test_qabf_properties():
    a, b, f = random_triple(seed=1, size=(24, 24))
    assert qabf(a, b, f) == pytest.approx(qabf(b, a, f))
    assert 0.0 <= qabf(a, b, f) <= PERFECT_COPY
    # keeping one source exactly beats a random fused image
    assert qabf(a, b, a) > qabf(a, b, f)
    # no edge in either source (all zero, so no border edges either): 0 / 0, as the reference
    black = np.zeros((4, 4), np.uint8)
    assert math.isnan(qabf(black, black, f[:4, :4]))


def test_qabf_matches_a_loop_transcription_of_the_matlab_reference():
    def reference(pa, pb, pf):
        # analysis_Qabf.m step by step: conv2 'same' (true convolution, zero padding), loops.
        h1 = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
        h3 = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]

        def conv2_same(x, k):
            rows, cols = x.shape
            out = np.zeros((rows, cols))
            for i in range(rows):
                for j in range(cols):
                    for u in range(3):
                        for v in range(3):
                            ii, jj = i - (u - 1), j - (v - 1)
                            if 0 <= ii < rows and 0 <= jj < cols:
                                out[i, j] += k[u][v] * float(x[ii, jj])
            return out

        def strength_orientation(p):
            sx, sy = conv2_same(p, h3), conv2_same(p, h1)
            g = np.sqrt(sx**2 + sy**2)
            alpha = np.zeros_like(g)
            for i, j in np.ndindex(g.shape):
                alpha[i, j] = math.pi / 2 if sx[i, j] == 0 else math.atan(sy[i, j] / sx[i, j])
            return g, alpha

        (ga, aa), (gb, ab), (gf, af) = map(strength_orientation, (pa, pb, pf))

        def kept(gx, ax):
            q = np.zeros_like(gx)
            for i, j in np.ndindex(gx.shape):
                if gx[i, j] > gf[i, j]:
                    ratio = gf[i, j] / gx[i, j]
                elif gx[i, j] == gf[i, j]:
                    ratio = gf[i, j]
                else:
                    ratio = gx[i, j] / gf[i, j]
                q[i, j] = strength_kept(ratio) * orientation_kept(1 - abs(ax[i, j] - af[i, j]) / (math.pi / 2))
            return q

        return (kept(ga, aa) * ga + kept(gb, ab) * gb).sum() / (ga + gb).sum()

    a, b, f = random_triple(seed=2, size=(7, 9))
    coarse = (a // 64 * 64).astype(np.uint8)  # many equal strengths: exercises the tie branch
    for triple in [(a, b, f), (a, b, a), (coarse, coarse, coarse), (coarse, b, f)]:
        assert qabf(*triple) == pytest.approx(reference(*triple), rel=1e-12)


# --- all of them, and bad input ----------------------------------------------


def test_fusion_metrics_keys_and_values():
    ir, vi, fused = random_triple(seed=3)
    metrics = fusion_metrics(ir, vi, fused[..., None])
    assert list(metrics) == ["en", "sd", "sf", "mi", "qabf"]
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["en"] == entropy(fused)
    assert metrics["sd"] == standard_deviation(fused)
    assert metrics["sf"] == spatial_frequency(fused)
    assert metrics["mi"] == mutual_information(ir, vi, fused)
    assert metrics["qabf"] == qabf(ir, vi, fused)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.uint8), r"gray \(H, W\) or \(H, W, 1\) image, got shape \(4, 4, 3\)"),
        (np.zeros(16, np.uint8), r"got shape \(16,\)"),
        (np.zeros((4, 4), np.float32), "must be uint8"),
        (np.zeros((0, 4), np.uint8), "empty"),
    ],
)
def test_bad_images_raise(bad, message):
    good = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=message):
        entropy(bad)
    with pytest.raises(ValueError, match=message):
        qabf(good, good, bad)
    with pytest.raises(ValueError, match=message):
        fusion_metrics(bad, good, good)


def test_shape_mismatch_names_the_images():
    good = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"same \(H, W\).*'f': \(4, 5\)"):
        mutual_information(good, good, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"'vi': \(5, 4\)"):
        fusion_metrics(good, np.zeros((5, 4), np.uint8), good)
