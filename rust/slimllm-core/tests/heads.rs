//! Head-pair statistics, objective, scores and the greedy head selection against brute force.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas
mod common;

use common::*;
use faer::{Mat, Par};
use slimllm_core::heads::{select_heads, HeadMode, HeadPairStats};
use slimllm_core::moments::Moments;
use slimllm_core::SlimError;

/// Per-token head outputs o_a[t, j] = x_a[t] · W_o[j, a-block], materialised: out[a] is (n × d).
fn head_outputs(x: &Mat<f64>, w_o: &Mat<f64>, heads: usize) -> Vec<Mat<f64>> {
    let h = x.ncols() / heads;
    (0..heads)
        .map(|a| {
            Mat::from_fn(x.nrows(), w_o.nrows(), |t, j| {
                (a * h..(a + 1) * h).map(|i| x[(t, i)] * w_o[(j, i)]).sum()
            })
        })
        .collect()
}

/// Σ_{a∈set} o_a, column j.
fn sum_col(o: &[Mat<f64>], set: &[usize], j: usize) -> Vec<f64> {
    let n = o[0].nrows();
    (0..n)
        .map(|t| set.iter().map(|&a| o[a][(t, j)]).sum())
        .collect()
}

/// F(K) straight from the token data (two-pass covariances).
fn token_objective(o: &[Mat<f64>], kept: &[usize]) -> f64 {
    let all: Vec<usize> = (0..o.len()).collect();
    (0..o[0].ncols())
        .map(|j| {
            let yk = sum_col(o, kept, j);
            let y = sum_col(o, &all, j);
            abs_rho(cov2(&yk, &y), cov2(&yk, &yk), cov2(&y, &y))
        })
        .sum()
}

/// F(K) from M by explicit loops (the reference of the greedy tests).
fn naive_f(m: &[f64], units: usize, d: usize, kept: &[bool]) -> f64 {
    let at = |a: usize, b: usize, j: usize| m[(a * units + b) * d + j];
    (0..d)
        .map(|j| {
            let (mut cov, mut var_k, mut var) = (0.0, 0.0, 0.0);
            for a in 0..units {
                for b in 0..units {
                    var += at(a, b, j);
                    if kept[a] {
                        cov += at(a, b, j);
                        if kept[b] {
                            var_k += at(a, b, j);
                        }
                    }
                }
            }
            abs_rho(cov, var_k, var)
        })
        .sum()
}

fn setup(seed: u64, n: usize, heads: usize, h: usize, d: usize) -> (Mat<f64>, Mat<f64>, Moments) {
    let mut r = rng(seed);
    let x = correlated(&mut r, n, heads * h, 1.5);
    let w_o = randn(&mut r, d, heads * h);
    let mut mo = Moments::new(heads * h);
    mo.update(x.as_ref(), Par::Seq).unwrap();
    (x, w_o, mo)
}

#[test]
fn m_matches_materialised_head_outputs() {
    let (heads, h, d, n) = (5, 3, 7, 400);
    let (x, w_o, mo) = setup(11, n, heads, h, d);
    let cov = mo.covariance().unwrap();
    let m = HeadPairStats::compute(cov.as_ref(), w_o.as_ref(), heads, Par::Seq).unwrap();
    assert_eq!(
        (m.units(), m.out_dim(), m.as_slice().len()),
        (heads, d, heads * heads * d)
    );
    let o = head_outputs(&x, &w_o, heads);
    let mut scale: f64 = 0.0;
    for j in 0..d {
        scale = scale.max(cov2(
            &sum_col(&o, &(0..heads).collect::<Vec<_>>(), j),
            &sum_col(&o, &(0..heads).collect::<Vec<_>>(), j),
        ));
    }
    let tol = 1e-12 * n as f64 * scale;
    for a in 0..heads {
        for b in 0..heads {
            for j in 0..d {
                let direct = cov2(&col(&o[a], j), &col(&o[b], j));
                assert!((m.pair(a, b)[j] - direct).abs() < tol, "M[{a},{b},{j}]");
            }
        }
    }
    // cov(y_K, y), var(y_K), objective and scores for a few kept sets
    let all: Vec<usize> = (0..heads).collect();
    for kept in [vec![0usize, 2], vec![1, 3, 4], vec![4], all.clone(), vec![]] {
        let f = m.objective(&kept).unwrap();
        let ft = token_objective(&o, &kept);
        assert!(
            (f - ft).abs() < 1e-9 * d as f64,
            "F({kept:?}) = {f} vs {ft}"
        );
        for j in 0..d {
            let (yk, y) = (sum_col(&o, &kept, j), sum_col(&o, &all, j));
            let cov_m: f64 = kept
                .iter()
                .map(|&a| (0..heads).map(|b| m.pair(a, b)[j]).sum::<f64>())
                .sum();
            let var_m: f64 = kept
                .iter()
                .map(|&a| kept.iter().map(|&b| m.pair(a, b)[j]).sum::<f64>())
                .sum();
            assert!((cov_m - cov2(&yk, &y)).abs() < tol);
            assert!((var_m - cov2(&yk, &yk)).abs() < tol);
        }
    }
    let scores = m.scores();
    for a in 0..heads {
        let rest: Vec<usize> = (0..heads).filter(|&b| b != a).collect();
        assert!((scores[a] - token_objective(&o, &rest)).abs() < 1e-9 * d as f64);
        assert!((scores[a] - m.objective(&rest).unwrap()).abs() < 1e-12 * d as f64);
    }
}

#[test]
fn compute_rayon_equals_seq_and_rectangular_w_o() {
    let (heads, h, d, n) = (6, 4, 3, 100);
    let (_, w_o, mo) = setup(12, n, heads, h, d);
    let cov = mo.covariance().unwrap();
    let a = HeadPairStats::compute(cov.as_ref(), w_o.as_ref(), heads, Par::Seq).unwrap();
    let b = HeadPairStats::compute(cov.as_ref(), w_o.as_ref(), heads, Par::rayon(2)).unwrap();
    assert_eq!(a, b);
    // a row-major w_o view gives the same numbers
    let wt = w_o.transpose().to_owned();
    let c = HeadPairStats::compute(cov.as_ref(), wt.as_ref().transpose(), heads, Par::Seq).unwrap();
    assert!(max_abs_diff_vec(a.as_slice(), c.as_slice()) < 1e-12);
}

#[test]
fn constant_data_objective_is_zero_not_nan() {
    let (heads, h, d) = (4, 2, 5);
    let x = Mat::<f64>::from_fn(30, heads * h, |_, j| 0.3 * j as f64 - 1.0);
    let mut r = rng(13);
    let w_o = randn(&mut r, d, heads * h);
    let mut mo = Moments::new(heads * h);
    mo.update(x.as_ref(), Par::Seq).unwrap();
    let m = HeadPairStats::compute(
        mo.covariance().unwrap().as_ref(),
        w_o.as_ref(),
        heads,
        Par::Seq,
    )
    .unwrap();
    assert_eq!(m.objective(&[0, 1]).unwrap(), 0.0);
    assert_eq!(m.scores(), vec![0.0; heads]);
    let sel = select_heads(&m, 2, 2, HeadMode::Uniform, true).unwrap();
    assert_eq!(
        (sel.objective, sel.initial_objective, sel.swaps),
        (0.0, 0.0, 0)
    );
    assert_eq!(sel.pruned, vec![0, 2]);
}

#[test]
fn shape_and_index_errors() {
    let cov = Mat::<f64>::zeros(6, 6);
    let w = Mat::<f64>::zeros(2, 6);
    assert!(matches!(
        HeadPairStats::compute(cov.as_ref(), w.as_ref(), 4, Par::Seq),
        Err(SlimError::ShapeMismatch { got: 6, .. })
    ));
    assert!(matches!(
        HeadPairStats::compute(cov.as_ref(), w.as_ref(), 0, Par::Seq),
        Err(SlimError::InvalidCount { value: 0, .. })
    ));
    assert!(matches!(
        HeadPairStats::compute(cov.as_ref().subcols(0, 5), w.as_ref(), 3, Par::Seq),
        Err(SlimError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        HeadPairStats::compute(cov.as_ref(), w.as_ref().subcols(0, 4), 2, Par::Seq),
        Err(SlimError::ShapeMismatch {
            expected: 6,
            got: 4,
            ..
        })
    ));
    let mut bad = cov.clone();
    bad[(4, 1)] = f64::NAN;
    assert_eq!(
        HeadPairStats::compute(bad.as_ref(), w.as_ref(), 3, Par::Seq).unwrap_err(),
        SlimError::NonFinite {
            what: "cov".into(),
            row: 4,
            col: 1
        }
    );
    assert!(matches!(
        HeadPairStats::from_vec(2, 3, vec![0.0; 11]),
        Err(SlimError::ShapeMismatch { expected: 12, .. })
    ));
    let mut v = vec![0.0; 12];
    v[7] = f64::INFINITY;
    assert!(matches!(
        HeadPairStats::from_vec(2, 3, v),
        Err(SlimError::NonFinite { row: 2, col: 1, .. })
    ));
    let m = HeadPairStats::from_vec(4, 1, vec![1.0; 16]).unwrap();
    assert!(matches!(
        m.objective(&[4]),
        Err(SlimError::InvalidCount { value: 4, .. })
    ));
    assert!(matches!(
        m.objective(&[1, 1]),
        Err(SlimError::InvalidCount { value: 1, .. })
    ));
    assert!(matches!(
        m.group(3),
        Err(SlimError::InvalidCount { value: 3, .. })
    ));
    assert!(matches!(m.group(0), Err(SlimError::InvalidCount { .. })));
    // select_heads counts
    assert!(matches!(
        select_heads(&m, 1, 2, HeadMode::Uniform, false),
        Err(SlimError::InvalidCount { value: 1, .. })
    ));
    assert!(matches!(
        select_heads(&m, 4, 2, HeadMode::Uniform, false),
        Err(SlimError::InvalidCount {
            value: 4,
            max: 2,
            ..
        })
    ));
    assert!(matches!(
        select_heads(&m, 4, 4, HeadMode::Uniform, false),
        Err(SlimError::InvalidCount {
            value: 4,
            max: 0,
            ..
        })
    ));
    assert!(matches!(
        select_heads(&m, 0, 3, HeadMode::Uniform, false),
        Err(SlimError::InvalidCount { value: 3, .. })
    ));
    assert!(matches!(
        select_heads(&m, 0, 0, HeadMode::KvGroup, false),
        Err(SlimError::InvalidCount { value: 0, .. })
    ));
    assert!(matches!(
        select_heads(&m, 2, 2, HeadMode::KvGroup, false),
        Err(SlimError::InvalidCount {
            value: 2,
            max: 1,
            ..
        })
    ));
    let none = select_heads(&m, 0, 2, HeadMode::Uniform, true).unwrap();
    assert_eq!((none.kept, none.pruned), (vec![0, 1, 2, 3], vec![]));
}

#[test]
fn group_sums_blocks() {
    let mut r = rng(14);
    let (u, d, g) = (6, 4, 3);
    let data: Vec<f64> = (0..u * u * d)
        .map(|_| rand::Rng::random_range(&mut r, -1.0..1.0))
        .collect();
    let m = HeadPairStats::from_vec(u, d, data.clone()).unwrap();
    let gm = m.group(g).unwrap();
    assert_eq!((gm.units(), gm.out_dim()), (g, d));
    for ga in 0..g {
        for gb in 0..g {
            for j in 0..d {
                let mut s = 0.0;
                for a in 2 * ga..2 * ga + 2 {
                    for b in 2 * gb..2 * gb + 2 {
                        s += data[(a * u + b) * d + j];
                    }
                }
                assert!((gm.pair(ga, gb)[j] - s).abs() < 1e-14);
            }
        }
    }
    // F on groups equals F on the corresponding query heads
    assert!((gm.objective(&[0, 2]).unwrap() - m.objective(&[0, 1, 4, 5]).unwrap()).abs() < 1e-12);
}

// ---------------------------------------------------------------------------------------------
// reference greedy (naive F recomputation per trial)
// ---------------------------------------------------------------------------------------------

struct RefResult {
    kept: Vec<bool>,
    initial: f64,
    fin: f64,
    swaps: usize,
}

fn reference_search(
    m: &[f64],
    units: usize,
    d: usize,
    group_of: &[usize],
    quota: &[usize],
    greedy: bool,
) -> RefResult {
    let scores: Vec<f64> = (0..units)
        .map(|a| {
            let mask: Vec<bool> = (0..units).map(|b| b != a).collect();
            naive_f(m, units, d, &mask)
        })
        .collect();
    let mut order: Vec<usize> = (0..units).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut kept = vec![true; units];
    let mut taken = vec![0; quota.len()];
    let mut pruned = vec![];
    for &a in &order {
        if taken[group_of[a]] < quota[group_of[a]] {
            taken[group_of[a]] += 1;
            kept[a] = false;
            pruned.push(a);
        }
    }
    let initial = naive_f(m, units, d, &kept);
    let mut cur = initial;
    let mut swaps = 0;
    if greedy {
        for &p in &pruned {
            let mut best: Option<usize> = None;
            let mut best_f = cur;
            for v in 0..units {
                if kept[v] && group_of[v] == group_of[p] {
                    let mut trial = kept.clone();
                    trial[v] = false;
                    trial[p] = true;
                    let f = naive_f(m, units, d, &trial);
                    if f > best_f {
                        best_f = f;
                        best = Some(v);
                    }
                }
            }
            if let Some(v) = best {
                kept[v] = false;
                kept[p] = true;
                cur = best_f;
                swaps += 1;
            }
        }
    }
    RefResult {
        kept,
        initial,
        fin: cur,
        swaps,
    }
}

fn random_m(seed: u64, heads: usize, h: usize, d: usize) -> HeadPairStats<'static> {
    let (_, w_o, mo) = setup(seed, 60 + heads * h, heads, h, d);
    HeadPairStats::compute(
        mo.covariance().unwrap().as_ref(),
        w_o.as_ref(),
        heads,
        Par::Seq,
    )
    .unwrap()
}

#[test]
fn select_heads_matches_reference_greedy() {
    let mut total_swaps = 0;
    let mut cases = 0;
    for (heads, g, h) in [(9usize, 3usize, 8usize), (8, 2, 4), (4, 4, 4)] {
        for seed in 0..6u64 {
            let d = 5 + seed as usize;
            let m = random_m(100 + seed * 7 + heads as u64, heads, h, d);
            let data = m.as_slice();
            let per = heads / g;
            for greedy in [false, true] {
                // Uniform mode: every admissible n_prune
                for k in 1..per {
                    let n_prune = k * g;
                    let sel = select_heads(&m, n_prune, g, HeadMode::Uniform, greedy).unwrap();
                    let group_of: Vec<usize> = (0..heads).map(|a| a / per).collect();
                    let r = reference_search(data, heads, d, &group_of, &vec![k; g], greedy);
                    let kept: Vec<usize> = (0..heads).filter(|&a| r.kept[a]).collect();
                    assert_eq!(
                        sel.kept, kept,
                        "uniform H={heads} G={g} seed={seed} n={n_prune} greedy={greedy}"
                    );
                    let pruned: Vec<usize> = (0..heads).filter(|&a| !r.kept[a]).collect();
                    assert_eq!(sel.pruned, pruned);
                    assert!(sel.pruned_kv_heads.is_empty());
                    assert_eq!(sel.swaps, r.swaps);
                    assert!((sel.initial_objective - r.initial).abs() < 1e-12 * d as f64);
                    assert!((sel.objective - r.fin).abs() < 1e-12 * d as f64);
                    assert!(
                        (sel.objective - m.objective(&sel.kept).unwrap()).abs() < 1e-12 * d as f64
                    );
                    assert!(sel.objective >= sel.initial_objective);
                    // every group loses exactly k heads
                    for grp in 0..g {
                        assert_eq!(sel.pruned.iter().filter(|&&a| a / per == grp).count(), k);
                    }
                    if !greedy {
                        assert_eq!(sel.swaps, 0);
                        assert_eq!(sel.objective, sel.initial_objective);
                    }
                    total_swaps += sel.swaps;
                    cases += 1;
                }
                // KvGroup mode
                let gm = m.group(g).unwrap();
                for n_prune in 1..g {
                    let sel = select_heads(&m, n_prune, g, HeadMode::KvGroup, greedy).unwrap();
                    let r = reference_search(gm.as_slice(), g, d, &vec![0; g], &[n_prune], greedy);
                    let pruned_groups: Vec<usize> = (0..g).filter(|&k| !r.kept[k]).collect();
                    assert_eq!(
                        sel.pruned_kv_heads, pruned_groups,
                        "kv H={heads} G={g} seed={seed}"
                    );
                    let pruned: Vec<usize> = (0..heads).filter(|&a| !r.kept[a / per]).collect();
                    let kept: Vec<usize> = (0..heads).filter(|&a| r.kept[a / per]).collect();
                    assert_eq!((sel.pruned.clone(), sel.kept.clone()), (pruned, kept));
                    assert_eq!(sel.swaps, r.swaps);
                    assert!((sel.objective - r.fin).abs() < 1e-12 * d as f64);
                    assert!((sel.initial_objective - r.initial).abs() < 1e-12 * d as f64);
                    assert!(
                        (sel.objective - m.objective(&sel.kept).unwrap()).abs() < 1e-10 * d as f64
                    );
                    assert!(sel.objective >= sel.initial_objective);
                    total_swaps += sel.swaps;
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 100);
    assert!(total_swaps > 0, "the swap path was never exercised");
}

#[test]
fn greedy_on_random_non_symmetric_m_matches_reference() {
    // from_vec accepts any finite data; the O(d) trial formula must not assume symmetry.
    let mut r = rng(15);
    let (u, d) = (8, 6);
    let mut swaps = 0;
    for _ in 0..20 {
        let data: Vec<f64> = (0..u * u * d)
            .map(|_| rand::Rng::random_range(&mut r, -0.3..1.0))
            .collect();
        let m = HeadPairStats::from_vec(u, d, data.clone()).unwrap();
        let sel = select_heads(&m, 4, 1, HeadMode::Uniform, true).unwrap();
        let rr = reference_search(&data, u, d, &vec![0; u], &[4], true);
        let kept: Vec<usize> = (0..u).filter(|&a| rr.kept[a]).collect();
        assert_eq!(sel.kept, kept);
        assert_eq!(sel.swaps, rr.swaps);
        swaps += sel.swaps;
    }
    assert!(swaps > 0);
}

#[test]
fn exhaustive_small_case_greedy_not_worse_than_initial() {
    // H = 6, G = 1: check the greedy result against all C(6,3) subsets for sanity bounds.
    let m = random_m(16, 6, 3, 5);
    let sel = select_heads(&m, 3, 1, HeadMode::Uniform, true).unwrap();
    let mut best: f64 = 0.0;
    for mask in 0u32..64 {
        if mask.count_ones() == 3 {
            let kept: Vec<usize> = (0..6).filter(|&a| mask >> a & 1 == 1).collect();
            best = best.max(m.objective(&kept).unwrap());
        }
    }
    assert!(sel.objective >= sel.initial_objective);
    assert!(sel.objective <= best + 1e-12);
}

/// Borrowed head-pair data (`from_slice`, as the bindings pass a float64 numpy buffer) gives
/// the same scores, objective and selections as owned data, with the same errors; grouping
/// with one unit per group is the identity.
#[test]
fn borrowed_data_matches_owned() {
    let (heads, h, d) = (6, 3, 5);
    let owned = random_m(41, heads, h, d);
    let data = owned.as_slice().to_vec();
    let borrowed = HeadPairStats::from_slice(heads, d, &data).unwrap();
    assert_eq!(borrowed, owned);
    assert_eq!(borrowed.scores(), owned.scores());
    assert_eq!(
        borrowed.objective(&[0, 2, 5]).unwrap(),
        owned.objective(&[0, 2, 5]).unwrap()
    );
    for (n, g, mode) in [(3, 3, HeadMode::Uniform), (2, 6, HeadMode::KvGroup)] {
        assert_eq!(
            select_heads(&borrowed, n, g, mode, true).unwrap(),
            select_heads(&owned, n, g, mode, true).unwrap()
        );
    }
    assert_eq!(owned.group(heads).unwrap(), owned);
    assert_eq!(borrowed.clone().into_vec(), data);
    assert!(matches!(
        HeadPairStats::from_slice(2, 3, &data[..11]),
        Err(SlimError::ShapeMismatch { expected: 12, .. })
    ));
    let mut bad = data[..12].to_vec();
    bad[7] = f64::NAN;
    assert!(matches!(
        HeadPairStats::from_slice(2, 3, &bad),
        Err(SlimError::NonFinite { row: 2, col: 1, .. })
    ));
}
