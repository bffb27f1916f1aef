#!/usr/bin/env python3
"""Benchmark of slimllm's Rust core (``slimllm._core``) against numpy doing the same maths.

For each kernel the table gives the core's wall time, the time of a numpy implementation of the
same computation (from the same statistics, float64, measured in the same run), their ratio
(numpy / core: > 1 means the core is faster) and whether the two results agree. Shapes:

* ``7b``: Llama-2-7B-like, d = D = 4096, H = G = 32 (MHA: heads chosen as whole KV groups,
  the paper's unconstrained selection), h = 128, F = 11008, N = 4096 tokens.
* ``smollm2``: SmolLM2-135M, d = D = 576, H = 9, G = 3 (GQA, "uniform" selection), h = 64,
  F = 1536, N = 4096 tokens.

Timings are medians over ``--repeat`` runs (the 7b shapes use a fifth of them, at least one),
after one untimed warm-up call for kernels that take under a second.
This is a benchmark, not a test: nothing here asserts on time. The exit status is 1 only if a
core result disagrees with numpy.

    python benches/bench_core.py [--shapes 7b,smollm2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
from slimllm import _core


@dataclass(frozen=True)
class Shape:
    name: str
    d: int  # hidden size (o_proj output)
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tokens: int
    mode: str  # head selection mode

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim


SHAPES = {
    "7b": Shape("7b", 4096, 32, 32, 128, 11008, 4096, "kv-group"),
    "smollm2": Shape("smollm2", 576, 9, 3, 64, 1536, 4096, "uniform"),
}


def timed(fn, repeat: int):
    """(median seconds, result of the last call). A first call under a second is a warm-up
    (thread pools, page faults) and is not counted; slower kernels are timed from the start."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = [] if first < 1.0 else [first]
    while len(times) < repeat:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(b).max()), np.finfo(np.float64).tiny)
    return float(np.abs(a - b).max()) / scale


# ---------------------------------------------------------------------------- numpy side


def np_moments(x32: np.ndarray):
    x = x32.astype(np.float64)
    return x.shape[0], x.sum(0), x.T @ x


def np_covariance(n, s, gram):
    return (gram - np.outer(s, s) / n) / n


def np_head_pair_stats(cov, w_o, heads):
    d, dim = w_o.shape
    h = dim // heads
    m = np.empty((heads, heads, d))
    for a in range(heads):
        blk = slice(a * h, (a + 1) * h)
        p = (w_o[:, blk] @ cov[blk, :]) * w_o  # (d, D): W_a C_a,: elementwise W
        m[a] = p.reshape(d, heads, h).sum(2).T
    return m


def np_abs_rho_sum(cov, var_k, var):
    ok = (var_k > 0) & (var > 0)
    return float(np.abs(cov[ok] / np.sqrt(var_k[ok] * var[ok])).sum())


def np_scores(m):
    r = m.sum(1)  # (U, d): sum_b M[a, b]
    t = r.sum(0)
    out = []
    for a in range(m.shape[0]):
        cov = t - r[a]
        var_k = t - 2 * r[a] + m[a, a]
        out.append(np_abs_rho_sum(cov, var_k, t))
    return np.array(out)


def np_select(m, n_prune, kv_heads, mode):
    """Score-based selection + Algorithm 1 swap search on M, vectorised per trial."""
    heads = m.shape[0]
    per = heads // kv_heads
    if mode == "kv-group":
        units = m.reshape(kv_heads, per, kv_heads, per, -1).sum((1, 3))
        group_of, quota = [0] * kv_heads, {0: n_prune}
    else:
        units, group_of = m, [a // per for a in range(heads)]
        quota = {g: n_prune // kv_heads for g in range(kv_heads)}
    u = units.shape[0]
    sc = np_scores(units)
    order = sorted(range(u), key=lambda a: (-sc[a], a))
    taken = dict.fromkeys(quota, 0)
    pruned_order = []
    for a in order:
        if taken[group_of[a]] < quota[group_of[a]]:
            taken[group_of[a]] += 1
            pruned_order.append(a)
    mask = np.ones(u, dtype=bool)
    mask[pruned_order] = False
    r = units.sum(1)
    total = r.sum(0)

    def state(mask):
        s_k = units[:, mask].sum(1)  # (U, d): sum_{b in K} M[a, b]
        return s_k, r[mask].sum(0), s_k[mask].sum(0)

    s_k, cov, var_k = state(mask)
    current = initial = np_abs_rho_sum(cov, var_k, total)
    swaps = 0
    for p in pruned_order:
        best, best_f = None, current
        for v in np.flatnonzero(mask):
            if group_of[v] != group_of[p]:
                continue
            c2 = cov + r[p] - r[v]
            v2 = var_k - 2 * s_k[v] + units[v, v] + 2 * s_k[p] - 2 * units[p, v] + units[p, p]
            f = np_abs_rho_sum(c2, v2, total)
            if f > best_f:
                best, best_f = v, f
        if best is not None:
            mask[p], mask[best] = True, False
            swaps += 1
            s_k, cov, var_k = state(mask)
            current = np_abs_rho_sum(cov, var_k, total)
    kept_units = np.flatnonzero(mask)
    kept = [a for a in range(heads) if (a // per if mode == "kv-group" else a) in kept_units]
    return kept, current, initial, swaps


def np_channel_scores(in_sumsq, act_sumsq, y_cov, w_gate, w_up, w_down):
    l_in, l_a = np.sqrt(in_sumsq), np.sqrt(act_sumsq)
    lam, vecs = np.linalg.eigh(y_cov)
    w = 1.0 / (1.0 + np.exp(-np.abs(lam) / np.abs(lam).mean()))
    wg, wu, wd = (a.astype(np.float64) for a in (w_gate, w_up, w_down))
    gate = np.linalg.norm(wg * l_in, axis=1)
    up = np.linalg.norm(wu * l_in, axis=1)
    down = l_a * np.linalg.norm(np.abs(wd.T @ vecs) * w, axis=1)
    return gate, up, down


def np_affine_fit_heads(n, s, m, w_o, kept, heads):
    mu = s / n
    h = w_o.shape[1] // heads
    cols = np.concatenate([np.arange(a * h, (a + 1) * h) for a in kept])
    w = w_o.astype(np.float64)
    cov = m[kept].sum((0, 1))
    var_k = m[np.ix_(kept, kept)].sum((0, 1))
    scale = np.ones_like(cov)
    ok = var_k > 0
    scale[ok] = cov[ok] / var_k[ok]
    bias = w @ mu - scale * (w[:, cols] @ mu[cols])
    return scale, bias


def np_ridge(n, s, gram, w, kept, damp):
    mu = s / n
    c = (gram - np.outer(s, s) / n) / n
    ckk = c[np.ix_(kept, kept)]
    lam = damp * float(np.mean(np.diag(ckk)))
    w64 = w.astype(np.float64)
    rhs = c[kept, :] @ w64.T
    ckk[np.diag_indices_from(ckk)] += lam
    w_new = np.linalg.solve(ckk, rhs).T
    return w_new, w64 @ mu - w_new @ mu[kept]


# ---------------------------------------------------------------------------- benchmark


def make_inputs(sh: Shape, rng: np.random.Generator):
    dim = sh.attn_dim
    # o_proj inputs: low-rank shared part + per-head scaled noise, float32 like activations
    x = rng.standard_normal((sh.tokens, 64)).astype(np.float32) @ (
        0.3 * rng.standard_normal((64, dim)).astype(np.float32)
    )
    x += rng.standard_normal((sh.tokens, dim), dtype=np.float32) * np.repeat(
        rng.uniform(0.2, 2.0, sh.heads), sh.head_dim
    ).astype(np.float32)
    w_o = (rng.standard_normal((sh.d, dim), dtype=np.float32) / math.sqrt(dim)).astype(np.float32)
    w_gate = rng.standard_normal((sh.ffn, sh.d), dtype=np.float32) / np.float32(math.sqrt(sh.d))
    w_up = rng.standard_normal((sh.ffn, sh.d), dtype=np.float32) / np.float32(math.sqrt(sh.d))
    w_down = rng.standard_normal((sh.d, sh.ffn), dtype=np.float32) / np.float32(math.sqrt(sh.ffn))
    in_sumsq = rng.uniform(0.5, 2.0, sh.d) * sh.tokens
    act_sumsq = rng.uniform(0.1, 3.0, sh.ffn) * sh.tokens
    a = rng.standard_normal((sh.d, 256)) / 16.0
    y_cov = a @ a.T + np.diag(rng.uniform(0.01, 0.1, sh.d))
    return x, w_o, w_gate, w_up, w_down, in_sumsq, act_sumsq, y_cov


def bench_shape(sh: Shape, repeat: int, rows: list):
    rng = np.random.default_rng(0)
    x, w_o, w_gate, w_up, w_down, in_sumsq, act_sumsq, y_cov = make_inputs(sh, rng)
    w_o64 = w_o.astype(np.float64)

    def row(kernel, t_core, t_np, err, tol, note=""):
        ok = err <= tol
        rows.append((sh.name, kernel, t_core, t_np, ok, err, note))
        print(
            f"  {kernel:<32} core {t_core * 1e3:10.1f} ms   numpy {t_np * 1e3:10.1f} ms"
            f"   numpy/core {t_np / t_core:6.2f}   {'agree' if ok else 'DISAGREE'} ({err:.1e})",
            flush=True,
        )

    print(
        f"{sh.name}: d={sh.d} H={sh.heads} G={sh.kv_heads} h={sh.head_dim} F={sh.ffn} "
        f"N={sh.tokens}, {repeat} repetition(s)",
        flush=True,
    )

    # Moments.update over N tokens (float32 activations, float64 sums)
    def core_update():
        acc = _core.Moments(sh.attn_dim)
        acc.update(x)
        return acc

    t_core, acc = timed(core_update, repeat)
    t_np, (n, s, gram) = timed(lambda: np_moments(x), repeat)
    row(f"Moments.update (N={sh.tokens})", t_core, t_np, rel_err(acc.gram, gram), 1e-10)

    t_core, cov = timed(acc.covariance, repeat)
    t_np, cov_np = timed(lambda: np_covariance(n, s, gram), repeat)
    row("Moments.covariance", t_core, t_np, rel_err(cov, cov_np), 1e-9)

    t_core, m = timed(lambda: _core.head_pair_stats(cov, w_o, sh.heads), repeat)
    t_np, m_np = timed(lambda: np_head_pair_stats(cov, w_o64, sh.heads), repeat)
    row("head_pair_stats", t_core, t_np, rel_err(m, m_np), 1e-9)

    n_prune = round(0.2 * sh.heads)
    if sh.mode == "uniform":
        n_prune = max(sh.kv_heads, n_prune // sh.kv_heads * sh.kv_heads)
    t_core, (sc, sel) = timed(
        lambda: (_core.head_scores(m), _core.select_heads(m, n_prune, sh.kv_heads, mode=sh.mode)),
        repeat,
    )
    t_np, (sc_np, sel_np) = timed(
        lambda: (np_scores(m), np_select(m, n_prune, sh.kv_heads, sh.mode)), repeat
    )
    same = sel.kept == sel_np[0] and sel.swaps == sel_np[3]
    err = max(rel_err(sc, sc_np), abs(sel.objective - sel_np[1]) / sel_np[1])
    row(
        f"head_scores+select_heads ({sh.mode})",
        t_core,
        t_np,
        err if same else math.inf,
        1e-9,
        f"pruned {len(sel.pruned)} heads, {sel.swaps} swap(s)",
    )

    args = (in_sumsq, act_sumsq, y_cov, w_gate, w_up, w_down)
    t_core, cs = timed(lambda: _core.channel_scores(*args), repeat)
    t_np, cs_np = timed(lambda: np_channel_scores(*args), repeat)
    err = max(rel_err(a, b) for a, b in zip(cs, cs_np, strict=True))
    row("channel_scores", t_core, t_np, err, 1e-8)

    t_core, fit = timed(lambda: _core.affine_fit_heads(acc, w_o, m, sel.kept), repeat)
    t_np, fit_np = timed(lambda: np_affine_fit_heads(n, s, m, w_o, sel.kept, sh.heads), repeat)
    err = max(rel_err(a, b) for a, b in zip(fit, fit_np, strict=True))
    row("affine_fit_heads", t_core, t_np, err, 1e-8)

    h = sh.head_dim
    kept_cols = [a * h + i for a in sel.kept for i in range(h)]
    t_core, rec = timed(lambda: _core.ridge_reconstruct(acc, w_o, kept_cols, 0.01), repeat)
    t_np, rec_np = timed(lambda: np_ridge(n, s, gram, w_o, kept_cols, 0.01), repeat)
    row(
        f"ridge_reconstruct ({len(kept_cols)} kept cols)",
        t_core,
        t_np,
        max(rel_err(a, b) for a, b in zip(rec, rec_np, strict=True)),
        1e-7,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="7b,smollm2", help="comma-separated: 7b, smollm2")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions (7b: a fifth, >= 1)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"slimllm._core vs numpy {np.__version__}; {os.cpu_count()} CPUs, load {load:.1f}\n")
    rows: list = []
    for name in names:
        sh = SHAPES[name]
        repeat = max(1, args.repeat // 5) if name == "7b" else max(1, args.repeat)
        bench_shape(sh, repeat, rows)
        print()

    print("| shapes | kernel | core (ms) | numpy (ms) | numpy/core | agree (max rel. err) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for shape, kernel, t_core, t_np, ok, err, note in rows:
        kernel = f"{kernel}; {note}" if note else kernel
        print(
            f"| {shape} | {kernel} | {t_core * 1e3:.1f} | {t_np * 1e3:.1f} | "
            f"{t_np / t_core:.2f} | {'yes' if ok else 'NO'} ({err:.1e}) |"
        )
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
