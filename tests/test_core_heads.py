"""slimllm._core head statistics, scores, objective and selection against a brute force that
materialises every head's per-token output (DESIGN.md section 2; paper Algorithm 1)."""

from __future__ import annotations

import bruteforce as bf
import numpy as np
import pytest
from slimllm import InvalidCountError, NonFiniteError, ShapeMismatchError, _core

N_TOKENS = 384
OUT_DIM = {64: 192, 128: 96}  # d per head size: smaller than D where it helps speed


class Case:
    """One attention layer (bruteforce.Attention) plus the core's view of it."""

    def __init__(self, num_heads: int, num_kv: int, head_dim: int, seed: int):
        ref = bf.attention(num_heads, num_kv, head_dim, N_TOKENS, OUT_DIM[head_dim], seed)
        self.H, self.G, self.h = num_heads, num_kv, head_dim
        self.D, self.d = num_heads * head_dim, OUT_DIM[head_dim]
        self.x, self.w_o, self.outs = ref.x, ref.w_o, ref.outs
        self.m_ref, self.cov_ref = ref.m, ref.cov
        acc = _core.Moments(self.D)
        acc.update(self.x[:100])
        acc.update(self.x[100:])
        self.moments = acc
        self.m = _core.head_pair_stats(acc.covariance(), self.w_o, num_heads)


_CASES: dict[tuple[int, int, int], Case] = {}


@pytest.fixture(params=bf.HEAD_SHAPES, ids=lambda s: "H%d-G%d-h%d" % s, scope="module")
def case(request) -> Case:
    key = request.param
    if key not in _CASES:
        _CASES[key] = Case(*key, seed=sum(key))
    return _CASES[key]


def test_head_pair_stats_match_materialised_outputs(case: Case):
    rtol = bf.rtol_for(N_TOKENS * case.h)
    assert case.m.shape == (case.H, case.H, case.d) and case.m.dtype == np.float64
    bf.assert_close(case.m, case.m_ref, rtol, "M from Moments")
    # from the two-pass numpy covariance too: the function alone
    m2 = _core.head_pair_stats(case.cov_ref, case.w_o, case.H)
    bf.assert_close(m2, case.m_ref, rtol, "M from np.cov")
    bf.assert_close(case.m, np.transpose(case.m, (1, 0, 2)), rtol, "M symmetric in (a, b)")
    # the M identities of DESIGN.md 2: var(y_j) = sum_ab M
    y = case.outs.sum(0)
    bf.assert_close(case.m.sum((0, 1)), y.var(0), rtol, "var(y) = sum M")


def test_head_pair_stats_float32_inputs(case: Case):
    cov32 = case.cov_ref.astype(np.float32)
    w32 = case.w_o.astype(np.float32)
    m32 = _core.head_pair_stats(cov32, w32, case.H)
    m64 = _core.head_pair_stats(cov32.astype(np.float64), w32.astype(np.float64), case.H)
    assert m32.dtype == np.float64
    bf.assert_close(m32, m64, bf.rtol_for(case.D), "float32 vs float64 of same values")
    # and the float32 rounding of the inputs only perturbs M at float32 precision
    bf.assert_close(m32, case.m_ref, 1e-5, "float32 M vs exact")


def test_head_scores_match_bruteforce(case: Case):
    got = _core.head_scores(case.m)
    ref = bf.scores(case.outs)
    assert got.shape == (case.H,) and got.dtype == np.float64
    bf.assert_close(got, ref, 1e-9, "head scores")
    assert np.all(got <= case.d + 1e-9) and np.all(got > 0)
    # float32 copy of M gives the scores of that copy
    bf.assert_close(_core.head_scores(case.m.astype(np.float32)), ref, 1e-5, "f32 scores")


def test_head_objective_matches_bruteforce(case: Case):
    rng = np.random.default_rng(case.H)
    subsets = [list(range(case.H)), [], [0], [case.H - 1, 0]]
    subsets += [
        sorted(rng.choice(case.H, size=k, replace=False).tolist())
        for k in (2, case.H // 2, case.H - 1)
    ]
    for kept in subsets:
        got = _core.head_objective(case.m, kept)
        ref = bf.objective(case.outs, kept)
        assert isinstance(got, float)
        assert abs(got - ref) <= 1e-9 * max(ref, 1.0), (kept, got, ref)
    # all heads: every rho_j is 1
    assert abs(_core.head_objective(case.m, list(range(case.H))) - case.d) <= 1e-9 * case.d
    # order and container type do not matter
    kept = [3, 1, 2]
    assert _core.head_objective(case.m, tuple(kept)) == pytest.approx(
        _core.head_objective(case.m, np.array(sorted(kept))), rel=1e-12
    )


def selection_params():
    out = []
    for h_, g_, hd in bf.HEAD_SHAPES:
        if h_ == g_:  # MHA: one query head per KV group
            runs = [("kv-group", h_, 8), ("kv-group", h_, 13), ("uniform", 1, 8)]
        else:
            runs = [
                ("uniform", g_, g_),
                ("uniform", g_, 2 * g_),
                ("kv-group", g_, 1),
                ("kv-group", g_, 2),
            ]
        for mode, g, n in runs:
            for greedy in (True, False):
                out.append(
                    pytest.param(
                        (h_, g_, hd),
                        mode,
                        g,
                        n,
                        greedy,
                        id=f"H{h_}-G{g_}-{mode}-G{g}-p{n}-{'greedy' if greedy else 'plain'}",
                    )
                )
    return out


@pytest.mark.parametrize("shape,mode,num_kv,n_prune,greedy", selection_params())
def test_select_heads_matches_naive_algorithm1(shape, mode, num_kv, n_prune, greedy):
    if shape not in _CASES:
        _CASES[shape] = Case(*shape, seed=sum(shape))
    c = _CASES[shape]
    sel = _core.select_heads(c.m, n_prune, num_kv, mode=mode, greedy=greedy)
    ref, ref_kv = bf.select_heads(c.outs, n_prune, num_kv, mode, greedy)
    assert isinstance(sel, _core.HeadSelection)
    assert sel.kept == ref.kept
    assert sel.pruned == ref.pruned
    assert sel.pruned_kv_heads == ref_kv
    assert sel.swaps == ref.swaps
    assert sel.objective == pytest.approx(ref.objective, rel=1e-9)
    assert sel.initial_objective == pytest.approx(ref.initial_objective, rel=1e-9)
    assert sel.objective == pytest.approx(_core.head_objective(c.m, sel.kept), rel=1e-12)
    assert sorted(sel.kept + sel.pruned) == list(range(c.H))
    per = c.H // num_kv
    n_heads_pruned = n_prune * per if mode == "kv-group" else n_prune
    assert len(sel.pruned) == n_heads_pruned
    if mode == "uniform":
        counts = np.bincount(np.array(sel.pruned) // per, minlength=num_kv)
        assert np.all(counts == n_prune // num_kv), counts
    else:
        assert sel.pruned == [a for g in sel.pruned_kv_heads for a in range(g * per, (g + 1) * per)]
    if greedy:
        assert sel.objective >= sel.initial_objective
    else:
        assert sel.swaps == 0 and sel.objective == sel.initial_objective


def redundant_pairs_case(seed: int):
    """Heads 0/1 and 2/3 are near-duplicates with large outputs: each alone scores as
    removable, removing both of a pair is not, so the greedy swap has work to do."""
    rng = np.random.default_rng(seed)
    H, h, d, n = 8, 16, 24, 400
    x = rng.standard_normal((n, H * h)) * np.repeat(rng.uniform(0.5, 1.0, H), h)
    x[:, h : 2 * h] = x[:, :h] + 0.05 * rng.standard_normal((n, h))
    x[:, 3 * h : 4 * h] = x[:, 2 * h : 3 * h] + 0.05 * rng.standard_normal((n, h))
    w_o = bf.weight(rng, d, H * h)
    w_o[:, h : 2 * h] = w_o[:, :h]
    w_o[:, 3 * h : 4 * h] = w_o[:, 2 * h : 3 * h]
    w_o[:, : 4 * h] *= 1.5
    acc = _core.Moments(H * h)
    acc.update(x)
    return _core.head_pair_stats(acc.covariance(), w_o, H), bf.head_outputs(x, w_o, H)


def test_greedy_swaps_repair_redundant_head_pairs():
    total = 0
    for seed in (2, 3):
        m, outs = redundant_pairs_case(seed)
        for mode, g, n in (
            ("uniform", 1, 4),
            ("uniform", 2, 4),
            ("kv-group", 4, 2),
            ("uniform", 1, 3),
        ):
            sel = _core.select_heads(m, n, g, mode=mode)
            ref, ref_kv = bf.select_heads(outs, n, g, mode, True)
            assert (sel.pruned, sel.pruned_kv_heads, sel.swaps) == (ref.pruned, ref_kv, ref.swaps)
            assert sel.objective == pytest.approx(ref.objective, rel=1e-9)
            assert sel.initial_objective == pytest.approx(ref.initial_objective, rel=1e-9)
            if sel.swaps:
                assert sel.objective > sel.initial_objective
            total += sel.swaps
    assert total >= 3  # the comparison above is not vacuous


def test_head_selection_is_frozen():
    c = _CASES.get((9, 3, 64)) or Case(9, 3, 64, seed=76)
    sel = _core.select_heads(c.m, 3, 3)
    with pytest.raises(AttributeError):
        sel.kept = [0]
    assert sel == _core.select_heads(c.m, 3, 3)
    assert "HeadSelection(" in repr(sel)


# ---------------------------------------------------------------------------- degenerate


def test_zero_variance_heads():
    """Constant inputs: C = 0, M = 0; every objective is 0 (not NaN), ties by lower index."""
    H, G, h, d = 9, 3, 64, 32
    x = np.full((50, H * h), 0.37)
    acc = _core.Moments(H * h)
    acc.update(x)
    w_o = bf.weight(np.random.default_rng(0), d, H * h)
    m = _core.head_pair_stats(acc.covariance(), w_o, H)
    np.testing.assert_array_equal(m, 0.0)
    np.testing.assert_array_equal(_core.head_scores(m), 0.0)
    assert _core.head_objective(m, [0, 1]) == 0.0
    sel = _core.select_heads(m, 3, G)
    assert sel.pruned == [0, 3, 6] and sel.objective == 0.0 and sel.swaps == 0
    sel = _core.select_heads(m, 1, G, mode="kv-group")
    assert sel.pruned_kv_heads == [0] and sel.pruned == [0, 1, 2]


def test_single_token_gives_zero_statistics():
    H, h, d = 4, 8, 5
    acc = _core.Moments(H * h)
    acc.update(np.random.default_rng(1).standard_normal((1, H * h)))
    m = _core.head_pair_stats(acc.covariance(), bf.weight(np.random.default_rng(2), d, H * h), H)
    np.testing.assert_array_equal(m, 0.0)
    assert _core.head_objective(m, [1, 2]) == 0.0


def test_zero_output_coordinates_contribute_nothing():
    """Rows of W_o that are zero: var(y_j) = 0 there, so rho_j counts 0 (DESIGN.md 2)."""
    c = _CASES.get((9, 3, 64)) or Case(9, 3, 64, seed=76)
    w_o = c.w_o.copy()
    w_o[[0, 5, 7]] = 0.0
    outs = bf.head_outputs(c.x, w_o, c.H)
    m = _core.head_pair_stats(c.cov_ref, w_o, c.H)
    assert np.all(m[:, :, [0, 5, 7]] == 0.0)
    kept = [0, 2, 4, 8]
    got = _core.head_objective(m, kept)
    assert got == pytest.approx(bf.objective(outs, kept), rel=1e-9)
    assert _core.head_objective(m, list(range(c.H))) == pytest.approx(c.d - 3, rel=1e-12)
    bf.assert_close(_core.head_scores(m), bf.scores(outs), 1e-9, "scores with zero rows")


# ---------------------------------------------------------------------------- errors


def test_head_function_errors():
    rng = np.random.default_rng(3)
    D, d, H = 24, 5, 4
    cov = np.eye(D)
    w_o = rng.standard_normal((d, D))
    with pytest.raises(ShapeMismatchError):
        _core.head_pair_stats(cov, w_o, 5)  # 24 not divisible by 5
    with pytest.raises(InvalidCountError):
        _core.head_pair_stats(cov, w_o, 0)
    with pytest.raises(ShapeMismatchError):
        _core.head_pair_stats(np.eye(D)[:, :20].copy(), w_o, H)  # not square
    with pytest.raises(ShapeMismatchError):
        _core.head_pair_stats(cov, w_o[:, :20].copy(), H)
    with pytest.raises(ShapeMismatchError, match="number of dimensions"):
        _core.head_pair_stats(np.ones(D), w_o, H)
    bad = w_o.copy()
    bad[2, 3] = np.nan
    with pytest.raises(NonFiniteError):
        _core.head_pair_stats(cov, bad, H)
    with pytest.raises(TypeError, match="`w_o`"):
        _core.head_pair_stats(cov, np.asfortranarray(w_o), H)
    with pytest.raises(TypeError, match="`cov`"):
        _core.head_pair_stats(np.asfortranarray(cov), w_o, H)

    m = _core.head_pair_stats(cov, w_o, H)
    with pytest.raises(InvalidCountError):
        _core.head_objective(m, [0, 0])
    with pytest.raises(InvalidCountError):
        _core.head_objective(m, [H])
    with pytest.raises(ShapeMismatchError):
        _core.head_scores(np.ones((4, 3, 5)))
    with pytest.raises(ShapeMismatchError, match="number of dimensions"):
        _core.head_scores(np.ones((4, 4)))
    with pytest.raises(TypeError, match="`m`"):
        _core.head_scores(np.ones((4, 4, 10))[:, :, ::2])
    m_nan = m.copy()
    m_nan[1, 2, 3] = np.inf
    with pytest.raises(NonFiniteError):
        _core.head_scores(m_nan)
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 1, 2)  # not a multiple of G
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 4, 2)  # leaves a group empty
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 4, 1)  # leaves no head
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 0, 3)  # 3 does not divide 4
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 2, 2, mode="kv-group")  # removes every group
    with pytest.raises(ValueError, match="mode"):
        _core.select_heads(m, 2, 2, mode="groups")
    sel = _core.select_heads(m, 0, 2)
    assert sel.pruned == [] and sel.kept == [0, 1, 2, 3]


def test_uniform_mode_with_one_head_per_group_cannot_prune():
    """G = H in "uniform" mode: each group would lose its only head, so only n_prune = 0."""
    m = _core.head_pair_stats(np.eye(8), np.ones((3, 8)), 4)
    with pytest.raises(InvalidCountError):
        _core.select_heads(m, 4, 4)
    assert _core.select_heads(m, 0, 4).pruned == []
