"""slimllm._core accumulators (Moments, SquareSums, PairedMoments) against numpy brute force.

DESIGN.md section 2 (first paragraph), section 3 and section 4 (numerics, bad input).
"""

from __future__ import annotations

import bruteforce as bf
import numpy as np
import pytest
from slimllm import (
    EmptyAccumulatorError,
    NonFiniteError,
    ShapeMismatchError,
    SlimLLMError,
    _core,
)


def feed(acc, x: np.ndarray, sizes) -> None:
    """Update ``acc`` with consecutive chunks of ``x`` of the given row counts (then the rest)."""
    start = 0
    for size in sizes:
        acc.update(np.ascontiguousarray(x[start : start + size]))
        start += size
    if start < len(x):
        acc.update(np.ascontiguousarray(x[start:]))


def check_moments(acc: _core.Moments, x: np.ndarray, rtol: float) -> None:
    ref = bf.moments(x)
    assert acc.count == ref.n
    assert acc.dim == x.shape[1]
    assert_scale = float(np.abs(x).max()) ** 2 * ref.n
    bf.assert_close(acc.sum, ref.sum, rtol, "sum", scale=float(np.abs(x).max()) * ref.n)
    bf.assert_close(acc.gram, ref.gram, rtol, "gram", scale=assert_scale)
    bf.assert_close(acc.mean(), ref.mean, rtol, "mean", scale=float(np.abs(x).max()))
    bf.assert_close(acc.covariance(), ref.cov, rtol, "covariance")
    cov = acc.covariance()
    assert cov.dtype == np.float64 and cov.shape == (x.shape[1], x.shape[1])
    np.testing.assert_array_equal(cov, cov.T)


# ---------------------------------------------------------------------------- Moments


@pytest.mark.parametrize(
    "n,dim,sizes",
    [(1000, 37, [1, 0, 17, 400]), (300, 576, [128, 128]), (256, 2048, [100])],
)
def test_moments_match_bruteforce(n, dim, sizes):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((n, dim)) * rng.uniform(0.1, 3.0, dim) + rng.uniform(-2, 2, dim)
    acc = _core.Moments(dim)
    feed(acc, x, sizes)
    check_moments(acc, x, bf.rtol_for(n))


def test_moments_accurate_with_large_offset():
    """Mean 1e4, std 1: a naive S - s s^T / n loses ~8 digits; DESIGN.md 4 asks for f64 care."""
    rng = np.random.default_rng(1)
    x = 1e4 + rng.standard_normal((2000, 16))
    acc = _core.Moments(16)
    feed(acc, x, [500, 500, 500])
    bf.assert_close(acc.covariance(), bf.moments(x).cov, 1e-9, "covariance at offset 1e4")


def test_moments_float32_matches_float64_of_same_values():
    rng = np.random.default_rng(2)
    x32 = (rng.standard_normal((700, 48)) + 0.5).astype(np.float32)
    a32, a64, mixed = _core.Moments(48), _core.Moments(48), _core.Moments(48)
    a32.update(x32)
    a64.update(x32.astype(np.float64))
    mixed.update(x32[:300])
    mixed.update(x32[300:].astype(np.float64))
    rtol = bf.rtol_for(700)
    for other in (a64, mixed):
        assert other.count == a32.count == 700
        bf.assert_close(a32.gram, other.gram, rtol, "gram f32 vs f64")
        bf.assert_close(a32.covariance(), other.covariance(), rtol, "cov f32 vs f64")
        bf.assert_close(a32.mean(), other.mean(), rtol, "mean f32 vs f64")
    check_moments(a32, x32.astype(np.float64), rtol)


def test_moments_merge_equals_one_shot():
    rng = np.random.default_rng(3)
    parts = [
        rng.standard_normal((n, 24)) * 2 + shift for n, shift in ((50, 5.0), (1, -3.0), (333, 0.0))
    ]
    whole = np.concatenate(parts)
    one_shot = _core.Moments(24)
    feed(one_shot, whole, [50, 1])
    accs = []
    for p in parts:
        a = _core.Moments(24)
        a.update(p)
        accs.append(a)
    merged = _core.Moments(24)  # starts empty: merging into an empty accumulator
    for a in accs:
        merged.merge(a)
    merged.merge(_core.Moments(24))  # merging an empty one changes nothing
    rtol = bf.rtol_for(len(whole))
    assert merged.count == one_shot.count == len(whole)
    bf.assert_close(merged.sum, one_shot.sum, rtol, "merged sum")
    bf.assert_close(merged.gram, one_shot.gram, rtol, "merged gram")
    bf.assert_close(merged.covariance(), one_shot.covariance(), rtol, "merged cov")
    check_moments(merged, whole, rtol)
    # the merged-in accumulators are untouched
    check_moments(accs[2], parts[2], bf.rtol_for(333))


def test_moments_merge_with_itself_doubles_the_stream():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 5)) + 1.0
    acc = _core.Moments(5)
    acc.update(x)
    acc.merge(acc)
    check_moments(acc, np.concatenate([x, x]), bf.rtol_for(80))


def test_moments_single_token_and_constant_columns():
    x = np.array([[1.5, -2.0, 0.25]])
    acc = _core.Moments(3)
    acc.update(x)
    assert acc.count == 1
    np.testing.assert_array_equal(acc.mean(), x[0])
    np.testing.assert_array_equal(acc.covariance(), np.zeros((3, 3)))
    np.testing.assert_allclose(acc.gram, np.outer(x[0], x[0]), rtol=1e-15)

    rng = np.random.default_rng(5)
    y = rng.standard_normal((500, 6))
    y[:, 2] = 3.7  # constant (not a power of two: exact cancellation is not free)
    y[:, 4] = 0.0
    acc = _core.Moments(6)
    feed(acc, y, [7, 100])
    cov = acc.covariance()
    for c in (2, 4):
        np.testing.assert_array_equal(cov[c], 0.0, err_msg=f"constant column {c}")
        np.testing.assert_array_equal(cov[:, c], 0.0, err_msg=f"constant column {c}")
    bf.assert_close(cov, bf.moments(y).cov, bf.rtol_for(500), "covariance")


def test_moments_empty():
    acc = _core.Moments(4)
    assert acc.count == 0 and acc.dim == 4
    np.testing.assert_array_equal(acc.sum, np.zeros(4))
    np.testing.assert_array_equal(acc.gram, np.zeros((4, 4)))
    with pytest.raises(EmptyAccumulatorError, match="no rows"):
        acc.mean()
    with pytest.raises(EmptyAccumulatorError):
        acc.covariance()
    acc.update(np.zeros((0, 4)))
    assert acc.count == 0
    with pytest.raises(EmptyAccumulatorError):
        acc.covariance()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_non_finite_leaves_accumulator_unchanged(bad, dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, 8))
    acc = _core.Moments(8)
    acc.update(x)
    before = (acc.count, acc.sum, acc.gram, acc.covariance())
    y = rng.standard_normal((20, 8)).astype(dtype)
    y[13, 5] = bad
    with pytest.raises(NonFiniteError, match=r"row 13, column 5"):
        acc.update(y)
    assert acc.count == before[0]
    np.testing.assert_array_equal(acc.sum, before[1])
    np.testing.assert_array_equal(acc.gram, before[2])
    np.testing.assert_array_equal(acc.covariance(), before[3])
    # still usable
    acc.update(np.nan_to_num(y, posinf=0.0, neginf=0.0, nan=0.0).astype(np.float64))
    assert acc.count == 50


def test_moments_bad_arguments():
    acc = _core.Moments(4)
    with pytest.raises(ShapeMismatchError, match="x"):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(ShapeMismatchError, match="number of dimensions"):
        acc.update(np.zeros(4))
    with pytest.raises(TypeError, match="`x`.*C-contiguous"):
        acc.update(np.zeros((3, 8))[:, ::2])
    with pytest.raises(TypeError, match="`x`.*C-contiguous"):
        acc.update(np.asfortranarray(np.ones((3, 4))))
    with pytest.raises(TypeError, match="`x`.*dtype"):
        acc.update(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="`x`.*dtype"):
        acc.update(np.zeros((3, 4), dtype=np.float16))
    with pytest.raises(TypeError, match="`x`.*ndarray"):
        acc.update([[0.0] * 4])
    with pytest.raises(TypeError, match="`x`.*dtype"):
        acc.update(np.zeros((3, 4), dtype=">f8"))  # non-native byte order
    misaligned = np.frombuffer(bytes(8 * 12 + 1), dtype=np.float64, offset=1).reshape(3, 4)
    assert not misaligned.flags.aligned
    with pytest.raises(TypeError, match="`x`.*aligned"):
        acc.update(misaligned)
    with pytest.raises(ShapeMismatchError):
        acc.merge(_core.Moments(5))
    with pytest.raises(TypeError):
        acc.merge(_core.SquareSums(4))
    assert acc.count == 0  # nothing of the above was added
    assert issubclass(ShapeMismatchError, SlimLLMError)


# ---------------------------------------------------------------------------- SquareSums


def test_square_sums_match_bruteforce_and_merge():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((900, 1536)) * rng.uniform(0.1, 4.0, 1536)
    x[:, 10] = 0.0
    one = _core.SquareSums(1536)
    feed(one, x, [1, 300])
    rtol = bf.rtol_for(900)
    ref = (x**2).sum(0)
    assert one.count == 900 and one.dim == 1536
    bf.assert_close(one.sum_squares, ref, rtol, "sum_squares")
    bf.assert_close(one.norms(), np.sqrt(ref), rtol, "norms")
    assert one.norms()[10] == 0.0

    a, b = _core.SquareSums(1536), _core.SquareSums(1536)
    a.update(x[:450].astype(np.float32))
    b.update(x[450:].astype(np.float32))
    a.merge(b)
    x32 = x.astype(np.float32).astype(np.float64)
    assert a.count == 900
    bf.assert_close(a.sum_squares, (x32**2).sum(0), rtol, "merged f32 sum_squares")
    a.merge(a)
    bf.assert_close(a.sum_squares, 2 * (x32**2).sum(0), rtol, "self-merge")


def test_square_sums_errors_and_unchanged_on_nan():
    acc = _core.SquareSums(3)
    np.testing.assert_array_equal(acc.norms(), np.zeros(3))
    acc.update(np.ones((2, 3)))
    bad = np.ones((2, 3))
    bad[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"row 1, column 0"):
        acc.update(bad)
    assert acc.count == 2
    np.testing.assert_array_equal(acc.sum_squares, [2.0, 2.0, 2.0])
    with pytest.raises(ShapeMismatchError):
        acc.update(np.ones((2, 4)))
    with pytest.raises(ShapeMismatchError):
        acc.merge(_core.SquareSums(4))
    with pytest.raises(TypeError, match="`x`"):
        acc.update(np.ones((4, 6))[:, ::2])


# ---------------------------------------------------------------------------- PairedMoments


def test_paired_moments_merge_equals_one_shot():
    rng = np.random.default_rng(8)
    full = rng.standard_normal((600, 40)) * 3 + 1
    pruned = 0.7 * full + 0.3 * rng.standard_normal((600, 40)) - 0.2
    one = _core.PairedMoments(40)
    one.update(pruned[:1], full[:1])
    one.update(pruned[1:], full[1:])
    parts = []
    for lo, hi in ((0, 250), (250, 251), (251, 600)):
        p = _core.PairedMoments(40)
        p.update(np.ascontiguousarray(pruned[lo:hi]), np.ascontiguousarray(full[lo:hi]))
        parts.append(p)
    merged = _core.PairedMoments(40)
    for p in parts:
        merged.merge(p)
    assert one.count == merged.count == 600 and merged.dim == 40
    s1, b1 = _core.affine_from_paired(one)
    s2, b2 = _core.affine_from_paired(merged)
    rtol = bf.rtol_for(600)
    bf.assert_close(s2, s1, rtol, "merged scale")
    bf.assert_close(b2, b1, rtol, "merged bias", scale=float(np.abs(full).max()))
    ref_s, ref_b = bf.affine_fit(pruned, full)
    bf.assert_close(s1, ref_s, 1e-9, "scale vs polyfit")
    bf.assert_close(b1, ref_b, 1e-9, "bias vs polyfit", scale=float(np.abs(full).max()))


def test_paired_moments_dtypes_and_errors():
    rng = np.random.default_rng(9)
    full = rng.standard_normal((100, 8)).astype(np.float32)
    pruned = (0.5 * full + 0.1 * rng.standard_normal((100, 8))).astype(np.float32)
    a, b, c = _core.PairedMoments(8), _core.PairedMoments(8), _core.PairedMoments(8)
    a.update(pruned, full)
    b.update(pruned.astype(np.float64), full.astype(np.float64))
    c.update(pruned, full.astype(np.float64))  # mixed dtypes: float32 upcast
    for other in (b, c):
        for x, y in zip(_core.affine_from_paired(a), _core.affine_from_paired(other), strict=True):
            bf.assert_close(x, y, bf.rtol_for(100), "float32 vs float64")

    before = _core.affine_from_paired(a)
    bad = full.copy()
    bad[50, 3] = np.inf
    with pytest.raises(NonFiniteError):
        a.update(pruned, bad)
    assert a.count == 100
    for x, y in zip(before, _core.affine_from_paired(a), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ShapeMismatchError):
        a.update(pruned[:, :4].copy(), full[:, :4].copy())
    with pytest.raises(ShapeMismatchError):
        a.update(pruned[:50], full)  # different token counts
    with pytest.raises(ShapeMismatchError):
        a.merge(_core.PairedMoments(9))
    with pytest.raises(TypeError, match="`full`"):
        a.update(pruned, np.asfortranarray(full))
    with pytest.raises(TypeError, match="`pruned`"):
        a.update(pruned[::2], full[:50])
    with pytest.raises(EmptyAccumulatorError):
        _core.affine_from_paired(_core.PairedMoments(8))
