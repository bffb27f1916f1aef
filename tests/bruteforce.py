"""Independent numpy brute force of the core maths (DESIGN.md sections 2-3), for the binding tests.

Everything here materialises what the core only keeps moments of, the way the authors' code
does: per-token head outputs o_a = x[:, a-block] @ W_o[:, a-block].T, per-channel intermediate
activations, two-pass (centred) covariances, ``np.linalg.eigh``, ``np.polyfit`` per output
coordinate, ``np.linalg.solve`` for ridge, and a naive re-implementation of the greedy swap of
Algorithm 1 that recomputes the Pearson objective from the materialised outputs at every trial.
Nothing here calls ``slimllm._core``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = np.finfo(np.float64).eps

# (H, G, h): SmolLM2-135M, Llama-3-8B-like GQA, Llama-2-7B-like MHA.
HEAD_SHAPES = [(9, 3, 64), (32, 8, 128), (32, 32, 128)]


# ---------------------------------------------------------------------------- comparisons


def rtol_for(n_terms: int, factor: float = 1e3) -> float:
    """A relative tolerance for float64 results built from sums of about ``n_terms`` terms."""
    return factor * EPS * math.sqrt(max(n_terms, 1))


def assert_close(actual, expected, rtol: float, what: str = "", scale: float | None = None):
    """max |actual - expected| <= rtol * scale, scale = max |expected| unless given (> 0).

    A size-scaled, relative comparison that also works for arrays with exact zeros.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in result"
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    scale = max(scale, np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.1e} * {scale:.3e}"


# ---------------------------------------------------------------------------- data


def attention_input(rng: np.random.Generator, n: int, num_heads: int, head_dim: int) -> np.ndarray:
    """o_proj inputs (n, H*h) with unequal head scales, cross-head correlation and an offset,
    so that heads differ in importance and centring matters."""
    dim = num_heads * head_dim
    shared = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim))
    own = rng.standard_normal((n, dim))
    scale = np.repeat(rng.uniform(0.2, 2.0, num_heads), head_dim)
    offset = rng.uniform(-1.0, 1.0, dim)
    return ((0.6 * shared + own) * scale + offset).astype(np.float64)


def weight(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.standard_normal((rows, cols)) / math.sqrt(cols)


@dataclass
class Attention:
    """One attention layer's o_proj: input x (N, D), weight w_o (d, D), head outputs
    (H, N, d), their pair statistics M (H, H, d) and the two-pass covariance of x."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    x: np.ndarray
    w_o: np.ndarray
    outs: np.ndarray
    m: np.ndarray
    cov: np.ndarray


def attention(
    num_heads: int, num_kv_heads: int, head_dim: int, n: int, d: int, seed: int
) -> Attention:
    rng = np.random.default_rng(seed)
    x = attention_input(rng, n, num_heads, head_dim)
    w_o = weight(rng, d, num_heads * head_dim)
    outs = head_outputs(x, w_o, num_heads)
    return Attention(
        num_heads, num_kv_heads, head_dim, x, w_o, outs, pair_stats(outs), moments(x).cov
    )


# ---------------------------------------------------------------------------- moments


@dataclass
class NpMoments:
    n: int
    sum: np.ndarray
    gram: np.ndarray
    mean: np.ndarray
    cov: np.ndarray


def moments(x: np.ndarray) -> NpMoments:
    """n, s, S directly, mean, and the two-pass population covariance (np.cov, bias=True)."""
    x = np.asarray(x, dtype=np.float64)
    cov = np.cov(x, rowvar=False, bias=True) if x.shape[0] > 1 else np.zeros((x.shape[1],) * 2)
    cov = np.atleast_2d(cov)
    return NpMoments(x.shape[0], x.sum(0), x.T @ x, x.mean(0), cov)


# ---------------------------------------------------------------------------- heads


def head_outputs(x: np.ndarray, w_o: np.ndarray, num_heads: int) -> np.ndarray:
    """o[a] = x[:, a-block] @ W_o[:, a-block].T for every head a: shape (H, N, d)."""
    h = x.shape[1] // num_heads
    return np.stack(
        [x[:, a * h : (a + 1) * h] @ w_o[:, a * h : (a + 1) * h].T for a in range(num_heads)]
    )


def group_outputs(outs: np.ndarray, num_groups: int) -> np.ndarray:
    """Sum consecutive blocks of H/G head outputs: the output of each KV group (G, N, d)."""
    per = outs.shape[0] // num_groups
    return outs.reshape(num_groups, per, *outs.shape[1:]).sum(1)


def pair_stats(outs: np.ndarray) -> np.ndarray:
    """M[a, b, j] = mean_t (o_a[t, j] - mean) (o_b[t, j] - mean), from materialised outputs."""
    centred = outs - outs.mean(1, keepdims=True)
    return np.einsum("atj,btj->abj", centred, centred) / outs.shape[1]


def pearson_per_coordinate(y_kept: np.ndarray, y_full: np.ndarray) -> np.ndarray:
    """rho_j between y_kept[:, j] and y_full[:, j], two-pass; 0 where either variance is 0."""
    a = y_kept - y_kept.mean(0)
    b = y_full - y_full.mean(0)
    cov = (a * b).mean(0)
    var_a = (a * a).mean(0)
    var_b = (b * b).mean(0)
    ok = (var_a > 0) & (var_b > 0)
    rho = np.zeros_like(cov)
    rho[ok] = cov[ok] / np.sqrt(var_a[ok] * var_b[ok])
    return rho


def objective(outs: np.ndarray, kept) -> float:
    """F(K) = sum_j |rho_j(K)| recomputed from the materialised unit outputs (U, N, d)."""
    kept = list(kept)
    y_full = outs.sum(0)
    y_kept = outs[kept].sum(0) if kept else np.zeros_like(y_full)
    return float(np.abs(pearson_per_coordinate(y_kept, y_full)).sum())


def scores(outs: np.ndarray) -> np.ndarray:
    """Paper score of every unit: F(all units except a)."""
    u = outs.shape[0]
    return np.array([objective(outs, [b for b in range(u) if b != a]) for a in range(u)])


@dataclass
class NpSelection:
    kept: list[int]
    pruned: list[int]
    objective: float
    initial_objective: float
    swaps: int


def greedy_select(outs: np.ndarray, group_of: list[int], quota: dict[int, int], greedy: bool):
    """Naive Algorithm 1 on unit outputs (U, N, d).

    Initial selection: units in descending score order (ties: lower index) are pruned while
    their group's quota lasts. Then, if ``greedy``, for each pruned unit u in that order, every
    kept unit v of the same group (ascending index) is tried as a swap; the best trial that
    strictly raises F(K) over the current value is applied. F is recomputed from the outputs.
    """
    u_count = outs.shape[0]
    sc = scores(outs)
    order = sorted(range(u_count), key=lambda a: (-sc[a], a))
    taken = {g: 0 for g in quota}
    pruned_order = []
    for a in order:
        g = group_of[a]
        if taken[g] < quota[g]:
            taken[g] += 1
            pruned_order.append(a)
    kept = set(range(u_count)) - set(pruned_order)
    initial = objective(outs, sorted(kept))
    current = initial
    swaps = 0
    if greedy:
        for p in pruned_order:
            best_v, best_f = None, current
            for v in sorted(kept):
                if group_of[v] != group_of[p]:
                    continue
                f = objective(outs, sorted((kept - {v}) | {p}))
                if f > best_f:
                    best_v, best_f = v, f
            if best_v is not None:
                kept = (kept - {best_v}) | {p}
                current = objective(outs, sorted(kept))
                swaps += 1
    kept_l = sorted(kept)
    return NpSelection(kept_l, sorted(set(range(u_count)) - kept), current, initial, swaps)


def select_heads(outs: np.ndarray, n_prune: int, num_kv_heads: int, mode: str, greedy: bool):
    """Brute-force counterpart of ``slimllm._core.select_heads`` on head outputs (H, N, d).

    Returns (NpSelection over query heads, pruned KV heads)."""
    num_heads = outs.shape[0]
    per = num_heads // num_kv_heads
    if mode == "uniform":
        group_of = [a // per for a in range(num_heads)]
        quota = {g: n_prune // num_kv_heads for g in range(num_kv_heads)}
        return greedy_select(outs, group_of, quota, greedy), []
    assert mode == "kv-group"
    sel = greedy_select(group_outputs(outs, num_kv_heads), [0] * num_kv_heads, {0: n_prune}, greedy)
    kept = [a for a in range(num_heads) if a // per in sel.kept]
    pruned = [a for a in range(num_heads) if a // per in sel.pruned]
    return NpSelection(kept, pruned, sel.objective, sel.initial_objective, sel.swaps), sel.pruned


# ---------------------------------------------------------------------------- channels


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


@dataclass
class Mlp:
    x: np.ndarray  # (N, d) MLP input
    a: np.ndarray  # (N, F) intermediate act(gate x) * up x
    y: np.ndarray  # (N, d) MLP output
    w_gate: np.ndarray  # (F, d)
    w_up: np.ndarray  # (F, d)
    w_down: np.ndarray  # (d, F)


def mlp(rng: np.random.Generator, n: int, d: int, f: int) -> Mlp:
    """A random SwiGLU MLP and its materialised per-token, per-channel activations."""
    x = rng.standard_normal((n, d)) * rng.uniform(0.3, 3.0, d) + rng.uniform(-0.5, 0.5, d)
    w_gate, w_up, w_down = weight(rng, f, d), weight(rng, f, d), weight(rng, d, f)
    w_down *= rng.uniform(0.2, 2.0, f)  # channels of unequal weight
    a = silu(x @ w_gate.T) * (x @ w_up.T)
    return Mlp(x, a, a @ w_down.T, w_gate, w_up, w_down)


def channel_scores(m: Mlp):
    """(gate, up, down) paper channel scores from the materialised activations (DESIGN.md 3)."""
    l_in = np.sqrt((m.x**2).sum(0))
    l_a = np.sqrt((m.a**2).sum(0))
    cov = np.cov(m.y, rowvar=False, bias=True)
    lam, vecs = np.linalg.eigh(cov)
    mean_abs = np.abs(lam).mean()
    w = 1.0 / (1.0 + np.exp(-(np.abs(lam) / mean_abs))) if mean_abs > 0 else np.full_like(lam, 0.5)
    gate = np.linalg.norm(m.w_gate * l_in, axis=1)
    up = np.linalg.norm(m.w_up * l_in, axis=1)
    down = l_a * np.linalg.norm(np.abs(m.w_down.T @ vecs) * w, axis=1)
    return gate, up, down


def select_channels(scores_: np.ndarray, n_prune: int, protect_lowest: float) -> np.ndarray:
    """Stable ascending sort, skip the lowest round(protect * F) (half to even, fewer if fewer
    remain), prune the next n_prune; sorted."""
    f = len(scores_)
    skip = min(round(protect_lowest * f), f - n_prune)
    order = np.argsort(scores_, kind="stable")
    return np.sort(order[skip : skip + n_prune])


# ---------------------------------------------------------------------------- recovery


def affine_fit(y_kept: np.ndarray, y_full: np.ndarray):
    """Per coordinate np.polyfit(y_kept[:, j], y_full[:, j], 1), as the authors' code; a
    coordinate where y_kept is constant gets scale 1, bias mean(y_full) - mean(y_kept)."""
    d = y_full.shape[1]
    scale, bias = np.ones(d), np.zeros(d)
    for j in range(d):
        if np.ptp(y_kept[:, j]) == 0.0:
            bias[j] = y_full[:, j].mean() - y_kept[:, j].mean()
            continue
        scale[j], bias[j] = np.polyfit(y_kept[:, j], y_full[:, j], 1)
    return scale, bias


def ridge(x: np.ndarray, w: np.ndarray, kept, damp: float):
    """Ridge reconstruction from materialised inputs: solve (C_KK + lam I) W'^T = C_K,: W^T with
    two-pass covariances, lam = damp * mean(diag C_KK) (damp when that mean is 0)."""
    kept = list(kept)
    y = x @ w.T
    xk = x[:, kept]
    xc = xk - xk.mean(0)
    yc = y - y.mean(0)
    n = x.shape[0]
    ckk = xc.T @ xc / n
    mean_diag = float(np.mean(np.diag(ckk)))
    lam = damp * mean_diag if mean_diag > 0.0 else damp
    w_new = np.linalg.solve(ckk + lam * np.eye(len(kept)), xc.T @ yc / n).T
    bias = y.mean(0) - w_new @ xk.mean(0)
    return w_new, bias
