"""slimllm._core recovery (affine fits, ridge reconstruction) against np.polyfit per output
coordinate and np.linalg.solve on materialised data (DESIGN.md sections 2 and 3)."""

from __future__ import annotations

import bruteforce as bf
import numpy as np
import pytest
from slimllm import (
    EmptyAccumulatorError,
    InvalidCountError,
    InvalidRatioError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeMismatchError,
    _core,
)

N_TOKENS = 320
OUT_DIM = 64


def core_side(ref: bf.Attention, chunks=(1, 99)):
    acc = _core.Moments(ref.x.shape[1])
    start = 0
    for size in chunks:
        acc.update(np.ascontiguousarray(ref.x[start : start + size]))
        start += size
    acc.update(np.ascontiguousarray(ref.x[start:]))
    return acc, _core.head_pair_stats(acc.covariance(), ref.w_o, ref.num_heads)


@pytest.fixture(params=bf.HEAD_SHAPES, ids=lambda s: "H%d-G%d-h%d" % s, scope="module")
def layer(request):
    ref = bf.attention(*request.param, n=N_TOKENS, d=OUT_DIM, seed=sum(request.param) + 1)
    return ref, *core_side(ref)


def check_affine(scale, bias, y_kept, y_full, what):
    ref_scale, ref_bias = bf.affine_fit(y_kept, y_full)
    assert scale.shape == bias.shape == (y_full.shape[1],)
    assert scale.dtype == bias.dtype == np.float64
    bf.assert_close(scale, ref_scale, 1e-8, f"{what}: scale")
    bf.assert_close(bias, ref_bias, 1e-8, f"{what}: bias", scale=float(np.abs(y_full).max()))


# ---------------------------------------------------------------------------- affine_fit_heads


def test_affine_fit_heads_matches_polyfit(layer):
    ref, acc, m = layer
    H, G = ref.num_heads, ref.num_kv_heads
    y = ref.outs.sum(0)
    rng = np.random.default_rng(H + G)
    n_prune = G if G < H else H // 4
    sel = _core.select_heads(m, n_prune, G if G < H else 1)
    subsets = [sel.kept, [0], sorted(rng.choice(H, size=H // 2, replace=False).tolist())]
    for kept in subsets:
        scale, bias = _core.affine_fit_heads(acc, ref.w_o, m, kept)
        check_affine(scale, bias, ref.outs[kept].sum(0), y, f"kept={kept}")
    # all heads kept: the identity map
    scale, bias = _core.affine_fit_heads(acc, ref.w_o, m, list(range(H)))
    bf.assert_close(scale, np.ones(OUT_DIM), 1e-10, "all kept: scale")
    bf.assert_close(bias, np.zeros(OUT_DIM), 1e-10, "all kept: bias", scale=float(np.abs(y).max()))


def test_affine_fit_heads_float32_weights(layer):
    ref, acc, m = layer
    kept = list(range(0, ref.num_heads, 2))
    w32 = ref.w_o.astype(np.float32)
    m32 = _core.head_pair_stats(acc.covariance(), w32, ref.num_heads)
    got = _core.affine_fit_heads(acc, w32, m32.astype(np.float32), kept)
    exp = _core.affine_fit_heads(
        acc, w32.astype(np.float64), m32.astype(np.float32).astype(np.float64), kept
    )
    for a, b in zip(got, exp, strict=True):
        bf.assert_close(a, b, bf.rtol_for(N_TOKENS), "float32 vs float64 of same values")
    outs = bf.head_outputs(ref.x, w32.astype(np.float64), ref.num_heads)
    ref_scale, _ = bf.affine_fit(outs[kept].sum(0), outs.sum(0))
    bf.assert_close(got[0], ref_scale, 1e-4, "float32 M rounding only")


def test_affine_fit_heads_zero_variance():
    """Kept heads with constant inputs: var(y_K, j) = 0, so scale 1 and
    bias = mean(y_j) - mean(y_K, j); rows of W_o that are 0 give scale 1, bias 0."""
    H, h, d = 9, 64, 40
    rng = np.random.default_rng(21)
    x = bf.attention_input(rng, 200, H, h)
    kept = [1, 4, 7]
    for a in kept:
        x[:, a * h : (a + 1) * h] = rng.standard_normal(h)  # constant over tokens
    w_o = bf.weight(rng, d, H * h)
    w_o[[3, 17]] = 0.0
    acc = _core.Moments(H * h)
    acc.update(x[:50])
    acc.update(x[50:])
    m = _core.head_pair_stats(acc.covariance(), w_o, H)
    scale, bias = _core.affine_fit_heads(acc, w_o, m, kept)
    np.testing.assert_array_equal(scale, 1.0)
    outs = bf.head_outputs(x, w_o, H)
    y, yk = outs.sum(0), outs[kept].sum(0)
    bf.assert_close(bias, y.mean(0) - yk.mean(0), 1e-10, "bias", scale=float(np.abs(y).max()))
    assert bias[3] == 0.0 and bias[17] == 0.0
    # and the objective of such a kept set is 0, not NaN
    assert _core.head_objective(m, kept) == 0.0


def test_affine_fit_heads_single_token():
    H, h, d = 4, 8, 6
    rng = np.random.default_rng(22)
    x = rng.standard_normal((1, H * h))
    w_o = bf.weight(rng, d, H * h)
    acc = _core.Moments(H * h)
    acc.update(x)
    m = _core.head_pair_stats(acc.covariance(), w_o, H)
    scale, bias = _core.affine_fit_heads(acc, w_o, m, [0, 2])
    outs = bf.head_outputs(x, w_o, H)
    np.testing.assert_array_equal(scale, 1.0)
    bf.assert_close(bias, outs.sum(0)[0] - outs[[0, 2]].sum(0)[0], 1e-12, "bias")


def test_affine_fit_heads_errors(layer):
    ref, acc, m = layer
    H = ref.num_heads
    with pytest.raises(EmptyAccumulatorError):
        _core.affine_fit_heads(_core.Moments(ref.x.shape[1]), ref.w_o, m, [0])
    with pytest.raises(ShapeMismatchError):
        _core.affine_fit_heads(acc, np.ascontiguousarray(ref.w_o[:, :-1]), m, [0])
    with pytest.raises(ShapeMismatchError):
        _core.affine_fit_heads(acc, ref.w_o, np.ascontiguousarray(m[:, :, :-1]), [0])
    with pytest.raises(InvalidCountError):
        _core.affine_fit_heads(acc, ref.w_o, m, [H])
    with pytest.raises(InvalidCountError):
        _core.affine_fit_heads(acc, ref.w_o, m, [1, 1])
    bad = ref.w_o.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        _core.affine_fit_heads(acc, bad, m, [0])
    with pytest.raises(TypeError, match="`w_o`"):
        _core.affine_fit_heads(acc, np.asfortranarray(ref.w_o), m, [0])
    with pytest.raises(TypeError, match="`m`"):
        _core.affine_fit_heads(acc, ref.w_o, m.transpose(1, 0, 2), [0])
    with pytest.raises(TypeError):
        _core.affine_fit_heads(_core.SquareSums(ref.x.shape[1]), ref.w_o, m, [0])


# ---------------------------------------------------------------------------- affine_from_paired


def test_affine_from_paired_mlp_recovery():
    """The MLP case: pruned output from the kept channels vs the full output."""
    mlp = bf.mlp(np.random.default_rng(23), 400, 48, 128)
    kept = np.sort(np.random.default_rng(24).choice(128, size=96, replace=False))
    pruned = mlp.a[:, kept] @ mlp.w_down[:, kept].T
    pruned[:, 5] = 0.25  # a coordinate with zero variance in the pruned output
    paired = _core.PairedMoments(48)
    for lo in range(0, 400, 64):
        paired.update(
            np.ascontiguousarray(pruned[lo : lo + 64]), np.ascontiguousarray(mlp.y[lo : lo + 64])
        )
    scale, bias = _core.affine_from_paired(paired)
    check_affine(scale, bias, pruned, mlp.y, "paired")
    assert scale[5] == 1.0
    assert bias[5] == pytest.approx(mlp.y[:, 5].mean() - 0.25, rel=1e-12)

    single = _core.PairedMoments(48)
    single.update(pruned[:1], mlp.y[:1])
    scale, bias = _core.affine_from_paired(single)
    np.testing.assert_array_equal(scale, 1.0)
    bf.assert_close(bias, mlp.y[0] - pruned[0], 1e-12, "single token bias")


# ---------------------------------------------------------------------------- ridge_reconstruct


def head_columns(kept_heads, h):
    return [a * h + i for a in kept_heads for i in range(h)]


@pytest.mark.parametrize("damp", [1e-3, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(9, 3, 64), (16, 4, 32)], ids=["H9-h64", "H16-h32"])
def test_ridge_matches_solve(shape, damp):
    H, G, h = shape
    ref = bf.attention(H, G, h, n=1000, d=96, seed=H + h)
    acc, _ = core_side(ref, chunks=(10, 500))
    kept = head_columns([a for a in range(H) if a % 3 != 1], h)
    w, b = _core.ridge_reconstruct(acc, ref.w_o, kept, damp)
    w_ref, b_ref = bf.ridge(ref.x, ref.w_o, kept, damp)
    assert w.shape == (96, len(kept)) and b.shape == (96,)
    assert w.dtype == b.dtype == np.float64 and w.flags.c_contiguous
    rtol = 1e-8 / min(damp, 1.0) ** 0.5
    bf.assert_close(w, w_ref, rtol, "weight")
    bf.assert_close(b, b_ref, rtol, "bias", scale=float(np.abs(ref.x @ ref.w_o.T).max()))
    # columns follow the order of `kept`
    perm = np.random.default_rng(0).permutation(len(kept))
    w_p, b_p = _core.ridge_reconstruct(acc, ref.w_o, [kept[i] for i in perm], damp)
    bf.assert_close(w_p, w[:, perm], 1e-9, "permuted kept")
    bf.assert_close(b_p, b, 1e-9, "permuted kept bias", scale=float(np.abs(b).max()))
    # float32 weight gives the float64 result of the same values
    w32 = ref.w_o.astype(np.float32)
    got = _core.ridge_reconstruct(acc, w32, kept, damp)
    exp = _core.ridge_reconstruct(acc, w32.astype(np.float64), kept, damp)
    bf.assert_close(got[0], exp[0], 1e-12, "float32 weight")


def test_ridge_without_damping_recovers_the_full_layer():
    """All columns kept, damp 0, N > D: W' = W and b = 0 (the exact least-squares answer)."""
    ref = bf.attention(4, 2, 16, n=500, d=20, seed=31)
    acc, _ = core_side(ref)
    w, b = _core.ridge_reconstruct(acc, ref.w_o, list(range(64)), 0.0)
    bf.assert_close(w, ref.w_o, 1e-8, "weight")
    bf.assert_close(b, np.zeros(20), 1e-8, "bias", scale=float(np.abs(ref.x @ ref.w_o.T).max()))


def test_ridge_constant_inputs():
    """Constant inputs: C = 0, lambda = damp, so W' = 0 and b = the mean output."""
    rng = np.random.default_rng(32)
    x = np.tile(rng.standard_normal(12), (40, 1))
    w = bf.weight(rng, 5, 12)
    acc = _core.Moments(12)
    acc.update(x)
    w_new, b = _core.ridge_reconstruct(acc, w, [0, 3, 4], 0.5)
    np.testing.assert_array_equal(w_new, 0.0)
    bf.assert_close(b, w @ x[0], 1e-12, "bias")
    # no damping on a singular system: a typed error, not garbage
    with pytest.raises(NotPositiveDefiniteError):
        _core.ridge_reconstruct(acc, w, [0, 3, 4], 0.0)


def test_ridge_errors():
    ref = bf.attention(4, 2, 8, n=50, d=6, seed=33)
    acc, _ = core_side(ref)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidRatioError):
            _core.ridge_reconstruct(acc, ref.w_o, [0, 1], bad)
    with pytest.raises(InvalidCountError):
        _core.ridge_reconstruct(acc, ref.w_o, [0, 0], 0.1)
    with pytest.raises(InvalidCountError):
        _core.ridge_reconstruct(acc, ref.w_o, [32], 0.1)
    with pytest.raises(EmptyAccumulatorError):
        _core.ridge_reconstruct(_core.Moments(32), ref.w_o, [0], 0.1)
    with pytest.raises(ShapeMismatchError):
        _core.ridge_reconstruct(acc, np.ascontiguousarray(ref.w_o[:, :31]), [0], 0.1)
    bad = ref.w_o.copy()
    bad[1, 1] = -np.inf
    with pytest.raises(NonFiniteError):
        _core.ridge_reconstruct(acc, bad, [0], 0.1)
    with pytest.raises(TypeError, match="`w`"):
        _core.ridge_reconstruct(acc, ref.w_o.T, [0], 0.1)
