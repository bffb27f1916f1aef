"""slimllm._core MLP channel scores and selection against a brute force over materialised
per-channel intermediate activations (DESIGN.md section 3; paper section 3.3)."""

from __future__ import annotations

import bruteforce as bf
import numpy as np
import pytest
from slimllm import InvalidCountError, InvalidRatioError, NonFiniteError, ShapeMismatchError, _core

ARGS = ("in_sumsq", "act_sumsq", "y_cov", "w_gate", "w_up", "w_down")


def core_inputs(m: bf.Mlp, chunk: int = 128) -> dict[str, np.ndarray]:
    """The statistics the pipeline streams (SquareSums, SquareSums, Moments) plus weights."""
    d, f = m.x.shape[1], m.a.shape[1]
    s_in, s_act, mom = _core.SquareSums(d), _core.SquareSums(f), _core.Moments(d)
    for lo in range(0, len(m.x), chunk):
        s_in.update(np.ascontiguousarray(m.x[lo : lo + chunk]))
        s_act.update(np.ascontiguousarray(m.a[lo : lo + chunk]))
        mom.update(np.ascontiguousarray(m.y[lo : lo + chunk]))
    return dict(
        in_sumsq=s_in.sum_squares,
        act_sumsq=s_act.sum_squares,
        y_cov=mom.covariance(),
        w_gate=m.w_gate,
        w_up=m.w_up,
        w_down=m.w_down,
    )


@pytest.mark.parametrize(
    "n,d,f",
    [(512, 64, 172), (512, 576, 1536), (100, 192, 512)],  # the last has N < d: rank-deficient
    ids=["small", "smollm2", "rank-deficient"],
)
def test_channel_scores_match_bruteforce(n, d, f):
    m = bf.mlp(np.random.default_rng(d), n, d, f)
    gate, up, down = _core.channel_scores(**core_inputs(m))
    ref = bf.channel_scores(m)
    for name, got, exp in zip(("gate", "up", "down"), (gate, up, down), ref, strict=True):
        assert got.shape == (f,) and got.dtype == np.float64
        bf.assert_close(got, exp, 1e-8, name)
    # and the total ranks channels the same way
    total = gate + up + down
    bf.assert_close(total, sum(ref), 1e-8, "total")
    n_prune = round(0.2 * f)
    np.testing.assert_array_equal(
        _core.select_channels(total, n_prune), bf.select_channels(sum(ref), n_prune, 0.01)
    )


def test_channel_scores_float32_inputs():
    m = bf.mlp(np.random.default_rng(11), 256, 64, 160)
    args = core_inputs(m)
    args32 = {k: v.astype(np.float32) for k, v in args.items()}
    args64 = {k: v.astype(np.float64) for k, v in args32.items()}
    for got, exp, ref in zip(
        _core.channel_scores(**args32),
        _core.channel_scores(**args64),
        bf.channel_scores(m),
        strict=True,
    ):
        bf.assert_close(got, exp, 1e-10, "float32 vs float64 of same values")
        bf.assert_close(got, ref, 1e-4, "float32 vs exact")


def test_channel_scores_degenerate_inputs():
    """Zero MLP input and a constant output: l_in = 0 so I_gate = I_up = 0; every eigenvalue
    is 0 so every PCA weight is sigmoid(0) = 0.5 and I_down = 0.5 l_a ||W_down[:, c]||."""
    rng = np.random.default_rng(12)
    d, f = 16, 40
    w_gate, w_up, w_down = bf.weight(rng, f, d), bf.weight(rng, f, d), bf.weight(rng, d, f)
    act = rng.uniform(0.0, 5.0, f)
    mom = _core.Moments(d)
    mom.update(np.tile(rng.standard_normal(d), (30, 1)))  # constant rows: covariance 0
    gate, up, down = _core.channel_scores(np.zeros(d), act, mom.covariance(), w_gate, w_up, w_down)
    np.testing.assert_array_equal(gate, 0.0)
    np.testing.assert_array_equal(up, 0.0)
    bf.assert_close(down, 0.5 * np.sqrt(act) * np.linalg.norm(w_down, axis=0), 1e-12, "down")
    # a dead channel (zero activation) scores 0 in I_down
    act[3] = 0.0
    assert (
        _core.channel_scores(np.ones(d), act, mom.covariance(), w_gate, w_up, w_down)[2][3] == 0.0
    )


@pytest.mark.parametrize("arg", ARGS)
def test_channel_scores_argument_errors(arg):
    m = bf.mlp(np.random.default_rng(13), 64, 8, 20)
    good = core_inputs(m)
    _core.channel_scores(**good)  # sanity

    short = dict(good)
    short[arg] = np.ascontiguousarray(good[arg][:-1])  # one row/element short
    with pytest.raises(ShapeMismatchError):
        _core.channel_scores(**short)

    bad = dict(good)
    bad[arg] = good[arg].copy()
    bad[arg].flat[1] = np.nan
    with pytest.raises(NonFiniteError):
        _core.channel_scores(**bad)

    strided = dict(good)
    strided[arg] = np.repeat(good[arg], 2, axis=-1)[..., ::2]
    np.testing.assert_array_equal(strided[arg], good[arg])
    with pytest.raises(TypeError, match=f"`{arg}`"):
        _core.channel_scores(**strided)

    wrong_ndim = dict(good)
    wrong_ndim[arg] = good[arg][None]
    with pytest.raises(ShapeMismatchError, match="number of dimensions"):
        _core.channel_scores(**wrong_ndim)


# ---------------------------------------------------------------------------- select_channels


@pytest.mark.parametrize("protect", [0.0, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("f,n_prune", [(1536, 300), (11008, 2200), (100, 1), (10, 9)])
def test_select_channels_matches_bruteforce(f, n_prune, protect):
    rng = np.random.default_rng(f + n_prune)
    scores = rng.standard_normal(f) ** 2
    scores[rng.choice(f, size=f // 5)] = 0.5  # ties: broken by lower index
    got = _core.select_channels(scores, n_prune, protect_lowest=protect)
    assert got.dtype == np.int64 and got.shape == (n_prune,)
    np.testing.assert_array_equal(got, bf.select_channels(scores, n_prune, protect))
    np.testing.assert_array_equal(
        _core.select_channels(scores.astype(np.float32), n_prune, protect),
        bf.select_channels(scores.astype(np.float32).astype(np.float64), n_prune, protect),
    )


def test_select_channels_rounding_and_default():
    # round half to even, as Python's round: 0.01 * 250 = 2.5 -> 2, 0.01 * 350 = 3.5 -> 4
    for f, skip in ((250, 2), (350, 4), (1536, 15), (11008, 110)):
        scores = np.arange(f, dtype=np.float64)
        np.testing.assert_array_equal(_core.select_channels(scores, 7), np.arange(skip, skip + 7))
    # all scores equal: lowest indices after the protected ones
    np.testing.assert_array_equal(_core.select_channels(np.ones(500), 10), np.arange(5, 15))
    np.testing.assert_array_equal(
        _core.select_channels(np.ones(500), 0), np.array([], dtype=np.int64)
    )


def test_select_channels_errors():
    s = np.arange(10.0)
    with pytest.raises(InvalidCountError):
        _core.select_channels(s, 10)
    for bad in (-0.01, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(InvalidRatioError):
            _core.select_channels(s, 2, protect_lowest=bad)
    nan = s.copy()
    nan[4] = np.nan
    with pytest.raises(NonFiniteError):
        _core.select_channels(nan, 2)
    with pytest.raises(ShapeMismatchError):
        _core.select_channels(s.reshape(2, 5), 2)
    with pytest.raises(TypeError, match="`scores`"):
        _core.select_channels(np.arange(10), 2)
    with pytest.raises(TypeError, match="`scores`"):
        _core.select_channels(np.arange(20.0)[::2], 2)
