//! Attention-head ranking and selection (DESIGN.md section 2; paper section 3.2, Algorithm 1).
//!
//! Notation: H query heads of dimension h, D = H·h, d output (hidden) size, G key/value heads.
//! `w_o` is the o_proj weight, shape (d, D); head a owns its columns a·h .. (a+1)·h.
//!
//! Head a's contribution to output coordinate j is o_a[:, j] = x_a · W_o[j, a-block], the full
//! output is y = Σ_a o_a and the output of a kept set K is y_K = Σ_{a∈K} o_a. Every second
//! moment of these sums is a sum of entries of the head-pair statistics
//! M[a, b, j] = cov(o_a[:, j], o_b[:, j]) ([`HeadPairStats`]), so the Pearson objective
//! F(K) = Σ_j |ρ_j(K)| of any kept set costs O(|K|² d) from M and O(d) per swap trial of the
//! greedy search ([`select_heads`]), with no pass over the calibration tokens.

use std::borrow::Cow;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Result, SlimError};
use crate::moments::{check_finite, shape_mismatch};

/// M[a, b, j] = W_o[j, a]ᵀ C[a, b] W_o[j, b] for every pair of units (heads, or KV groups after
/// [`HeadPairStats::group`]) and every output coordinate j; stored row-major as (units, units, d).
///
/// The data is owned (from [`HeadPairStats::compute`], [`HeadPairStats::from_vec`],
/// [`HeadPairStats::group`]) or borrowed from the caller ([`HeadPairStats::from_slice`], e.g.
/// a numpy buffer viewed without a copy); the lifetime `'a` is that of the borrowed data.
///
/// For a kept set K: cov(y_K,j, y_j) = Σ_{a∈K} Σ_b M[a,b,j]; var(y_K,j) = Σ_{a,b∈K} M[a,b,j];
/// var(y_j) = Σ_{a,b} M[a,b,j] (DESIGN.md section 2). Units of M: squared output units.
///
/// ```rust
/// use faer::{mat, Par};
/// use slimllm_core::heads::HeadPairStats;
///
/// // Two heads of dimension 1 with uncorrelated unit-variance inputs, one output coordinate.
/// let cov = mat![[1.0, 0.0], [0.0, 1.0]];
/// let w_o = mat![[1.0, 2.0]];
/// let m = HeadPairStats::compute(cov.as_ref(), w_o.as_ref(), 2, Par::Seq)?;
/// assert_eq!(m.as_slice(), &[1.0, 0.0, 0.0, 4.0]);
/// // Keeping head 1 alone: cov(y_K, y) = 4, var(y_K) = 4, var(y) = 5.
/// assert!((m.objective(&[1])? - 4.0 / (4.0f64 * 5.0).sqrt()).abs() < 1e-15);
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPairStats<'a> {
    units: usize,
    d: usize,
    data: Cow<'a, [f64]>,
}

/// |ρ| of one output coordinate; 0 when either variance is not positive (never NaN).
#[inline]
fn abs_rho(cov: f64, var_k: f64, var: f64) -> f64 {
    if var_k > 0.0 && var > 0.0 {
        (cov / (var_k.sqrt() * var.sqrt())).abs()
    } else {
        0.0
    }
}

impl HeadPairStats<'static> {
    /// Compute M from the covariance `cov` (D × D) of the o_proj input and `w_o` (d × D), with
    /// `num_heads` = H heads of h = D / H columns each.
    ///
    /// `cov` must be symmetric (as [`crate::moments::Moments::covariance`] is): only its
    /// blocks C[a, b] with a ≥ b are read and M[b, a, ·] is set to M[a, b, ·].
    /// Cost: for each head b one product Q_b = C[a≥b rows, b-block] · W_o[:, b-block]ᵀ, then
    /// M[a,b,j] = Σ_{i∈a-block} W_o[j,i] Q_b[i,j]; about D²d/2 multiply-adds in all. With
    /// `Par::Rayon` the heads b are processed in parallel (each product sequential); memory
    /// O(D d) per thread at most (products are done in row chunks).
    ///
    /// Errors: `ShapeMismatch` (cov not square, cov vs w_o columns, D not divisible by
    /// `num_heads`), `InvalidCount` for `num_heads == 0`, `NonFinite`.
    pub fn compute(
        cov: MatRef<'_, f64>,
        w_o: MatRef<'_, f64>,
        num_heads: usize,
        par: Par,
    ) -> Result<Self> {
        Self::compute_chunked(cov, w_o, num_heads, par, None)
    }

    /// [`HeadPairStats::compute`] with an explicit number of heads per product chunk.
    pub(crate) fn compute_chunked(
        cov: MatRef<'_, f64>,
        w_o: MatRef<'_, f64>,
        num_heads: usize,
        par: Par,
        chunk: Option<usize>,
    ) -> Result<Self> {
        if cov.ncols() != cov.nrows() {
            return Err(shape_mismatch(
                "cov columns (square)",
                cov.nrows(),
                cov.ncols(),
            ));
        }
        let big_d = cov.nrows();
        if w_o.ncols() != big_d {
            return Err(shape_mismatch(
                "w_o columns (= cov size D)",
                big_d,
                w_o.ncols(),
            ));
        }
        if num_heads == 0 {
            return Err(SlimError::InvalidCount {
                what: "num_heads".into(),
                value: 0,
                max: big_d,
            });
        }
        if big_d % num_heads != 0 {
            return Err(shape_mismatch(
                format!("w_o columns (D, a multiple of num_heads = {num_heads})"),
                big_d.div_ceil(num_heads) * num_heads,
                big_d,
            ));
        }
        check_finite(cov, "cov")?;
        check_finite(w_o, "w_o")?;
        let hh = num_heads;
        let h = big_d / hh;
        let d = w_o.nrows();
        // W_o^T, column-major (D x d): column j is row j of W_o, contiguous.
        let wt: Mat<f64> = w_o.transpose().to_owned();
        // Rows per product chunk: a multiple of h, about 4 Mi elements of Q.
        let chunk_heads = chunk.unwrap_or(((1usize << 22) / (h * d).max(1)).max(1));

        // For head b: M[a, b, j] for a = b..H, as a vec (H - b, d).
        let block = |b: usize, inner: Par| -> Vec<f64> {
            let mut out = vec![0.0; (hh - b) * d];
            let rhs = wt.as_ref().subrows(b * h, h); // (h, d) = W_o[:, b-block]^T
            let mut a0 = b;
            while a0 < hh {
                let na = chunk_heads.min(hh - a0);
                let lhs = cov.submatrix(a0 * h, b * h, na * h, h);
                let mut q = Mat::<f64>::zeros(na * h, d);
                matmul(q.as_mut(), Accum::Replace, lhs, rhs, 1.0, inner);
                for j in 0..d {
                    let qj = q.col(j).try_as_col_major().unwrap().as_slice();
                    let wj = wt.col(j).try_as_col_major().unwrap().as_slice();
                    let wj = &wj[a0 * h..(a0 + na) * h];
                    for (ai, (wa, qa)) in wj.chunks_exact(h).zip(qj.chunks_exact(h)).enumerate() {
                        let acc: f64 = wa.iter().zip(qa).map(|(w, q)| w * q).sum();
                        out[(a0 + ai - b) * d + j] = acc;
                    }
                }
                a0 += na;
            }
            out
        };
        let blocks: Vec<Vec<f64>> = match par {
            Par::Rayon(_) if hh > 1 => (0..hh)
                .into_par_iter()
                .map(|b| block(b, Par::Seq))
                .collect(),
            _ => (0..hh).map(|b| block(b, par)).collect(),
        };
        let mut data = vec![0.0; hh * hh * d];
        for (b, blk) in blocks.iter().enumerate() {
            for a in b..hh {
                let src = &blk[(a - b) * d..(a - b + 1) * d];
                data[(a * hh + b) * d..(a * hh + b + 1) * d].copy_from_slice(src);
                data[(b * hh + a) * d..(b * hh + a + 1) * d].copy_from_slice(src);
            }
        }
        Ok(Self {
            units: hh,
            d,
            data: Cow::Owned(data),
        })
    }

    /// Take ownership of a row-major (units, units, d) array: `data[(a·units + b)·d + j]` is
    /// M[a, b, j]. Errors as [`HeadPairStats::from_slice`].
    pub fn from_vec(units: usize, d: usize, data: Vec<f64>) -> Result<Self> {
        check_pair_data(units, d, &data)?;
        Ok(Self {
            units,
            d,
            data: Cow::Owned(data),
        })
    }
}

/// Length and finiteness checks of row-major (units, units, d) head-pair data.
fn check_pair_data(units: usize, d: usize, data: &[f64]) -> Result<()> {
    let expected = units * units * d;
    if data.len() != expected {
        return Err(shape_mismatch(
            "head-pair data length (units*units*d)",
            expected,
            data.len(),
        ));
    }
    if let Some(k) = data.iter().position(|v| !v.is_finite()) {
        return Err(SlimError::NonFinite {
            what: "head-pair data (row = a*units + b)".into(),
            row: k / d.max(1),
            col: k % d.max(1),
        });
    }
    Ok(())
}

impl<'a> HeadPairStats<'a> {
    /// Borrow a row-major (units, units, d) array without copying it:
    /// `data[(a·units + b)·d + j]` is M[a, b, j]. Errors: `ShapeMismatch` (length ≠ units²·d),
    /// `NonFinite` (row = a·units + b, col = j).
    pub fn from_slice(units: usize, d: usize, data: &'a [f64]) -> Result<Self> {
        check_pair_data(units, d, data)?;
        Ok(Self {
            units,
            d,
            data: Cow::Borrowed(data),
        })
    }

    /// The row-major (units, units, d) data as an owned vector (no copy if owned already).
    pub fn into_vec(self) -> Vec<f64> {
        self.data.into_owned()
    }

    /// Number of units (heads or groups).
    pub fn units(&self) -> usize {
        self.units
    }
    /// Output dimension d.
    pub fn out_dim(&self) -> usize {
        self.d
    }
    /// Row-major (units, units, d) data.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }
    /// M[a, b, ·] as a slice of length d.
    #[inline]
    pub fn pair(&self, a: usize, b: usize) -> &[f64] {
        let k = (a * self.units + b) * self.d;
        &self.data[k..k + self.d]
    }

    /// Sum consecutive blocks of `units / groups` units into one (heads -> KV groups):
    /// M'[g, g', j] = Σ_{a∈g, b∈g'} M[a, b, j]. With `groups == units` (one unit per group,
    /// e.g. MHA) M' = M, borrowed from `self` without a copy.
    /// Errors: `InvalidCount` when `groups` is 0, exceeds `units` or does not divide it.
    pub fn group(&self, groups: usize) -> Result<HeadPairStats<'_>> {
        if groups == 0 || groups > self.units || self.units % groups != 0 {
            return Err(SlimError::InvalidCount {
                what: format!("groups (must divide units = {})", self.units),
                value: groups,
                max: self.units,
            });
        }
        if groups == self.units {
            return HeadPairStats::from_slice(groups, self.d, &self.data[..]);
        }
        let k = self.units / groups;
        let d = self.d;
        let mut data = vec![0.0; groups * groups * d];
        for a in 0..self.units {
            for b in 0..self.units {
                let dst = ((a / k) * groups + b / k) * d;
                for (o, v) in data[dst..dst + d].iter_mut().zip(self.pair(a, b)) {
                    *o += v;
                }
            }
        }
        Ok(HeadPairStats {
            units: groups,
            d,
            data: Cow::Owned(data),
        })
    }

    /// Pearson objective F(K) = Σ_j |ρ_j(K)|, ρ_j = cov(y_K,j, y_j) / sqrt(var(y_K,j) var(y_j));
    /// a coordinate with either variance ≤ 0 contributes 0 (so F(∅) = 0, never NaN).
    /// Range 0 ..= d. Errors: `InvalidCount` for an index out of range or repeated.
    pub fn objective(&self, kept: &[usize]) -> Result<f64> {
        let mask = self.mask_of(kept, "kept unit")?;
        let sums = SetSums::new(self, &mask);
        Ok(sums.objective())
    }

    /// Paper head score: score_a = F(all units except a). High score = prune first.
    /// O(units² d).
    pub fn scores(&self) -> Vec<f64> {
        let (u, d) = (self.units, self.d);
        let rows = self.row_sums();
        let cols = self.col_sums();
        let var: Vec<f64> = (0..d)
            .map(|j| (0..u).map(|a| rows[a * d + j]).sum())
            .collect();
        (0..u)
            .map(|a| {
                let maa = self.pair(a, a);
                (0..d)
                    .map(|j| {
                        let r = rows[a * d + j];
                        let cov = var[j] - r;
                        let var_k = var[j] - r - cols[a * d + j] + maa[j];
                        abs_rho(cov, var_k, var[j])
                    })
                    .sum()
            })
            .collect()
    }

    /// r_a[j] = Σ_b M[a, b, j], as (units, d) row-major.
    fn row_sums(&self) -> Vec<f64> {
        let (u, d) = (self.units, self.d);
        let mut r = vec![0.0; u * d];
        for a in 0..u {
            for b in 0..u {
                for (o, v) in r[a * d..(a + 1) * d].iter_mut().zip(self.pair(a, b)) {
                    *o += v;
                }
            }
        }
        r
    }

    /// c_a[j] = Σ_b M[b, a, j], as (units, d) row-major.
    fn col_sums(&self) -> Vec<f64> {
        let (u, d) = (self.units, self.d);
        let mut c = vec![0.0; u * d];
        for a in 0..u {
            for b in 0..u {
                for (o, v) in c[a * d..(a + 1) * d].iter_mut().zip(self.pair(b, a)) {
                    *o += v;
                }
            }
        }
        c
    }

    /// Membership mask of an index list; `InvalidCount` on out-of-range or repeated index.
    pub(crate) fn mask_of(&self, kept: &[usize], what: &str) -> Result<Vec<bool>> {
        index_mask(self.units, kept, what)
    }
}

/// Membership mask of `idx` over `0..n`; `InvalidCount` on an index ≥ n or a repeated one.
pub(crate) fn index_mask(n: usize, idx: &[usize], what: &str) -> Result<Vec<bool>> {
    let mut mask = vec![false; n];
    for &i in idx {
        if i >= n {
            return Err(SlimError::InvalidCount {
                what: format!("{what} index"),
                value: i,
                max: n.saturating_sub(1),
            });
        }
        if mask[i] {
            return Err(SlimError::InvalidCount {
                what: format!("{what} index (repeated)"),
                value: i,
                max: n.saturating_sub(1),
            });
        }
        mask[i] = true;
    }
    Ok(mask)
}

/// Running sums of a kept set K used by the objective and by the swap search.
struct SetSums<'a> {
    m: &'a HeadPairStats<'a>,
    /// r_a[j] = Σ_b M[a,b,j] (independent of K).
    rows: Vec<f64>,
    /// var(y_j) = Σ_{a,b} M[a,b,j].
    var: Vec<f64>,
    /// m_K[a][j] = Σ_{b∈K} M[a,b,j].
    mk: Vec<f64>,
    /// c_K[a][j] = Σ_{b∈K} M[b,a,j].
    ck: Vec<f64>,
    /// cov(y_K,j, y_j) = Σ_{a∈K} r_a[j].
    cov: Vec<f64>,
    /// var(y_K,j) = Σ_{a∈K} m_K[a][j].
    var_k: Vec<f64>,
}

impl<'a> SetSums<'a> {
    fn new(m: &'a HeadPairStats<'a>, mask: &[bool]) -> Self {
        let (u, d) = (m.units, m.d);
        let rows = m.row_sums();
        let var = (0..d)
            .map(|j| (0..u).map(|a| rows[a * d + j]).sum())
            .collect();
        let mut s = SetSums {
            m,
            rows,
            var,
            mk: vec![0.0; u * d],
            ck: vec![0.0; u * d],
            cov: vec![0.0; d],
            var_k: vec![0.0; d],
        };
        s.reset(mask);
        s
    }

    /// Recompute every K-dependent sum from scratch (no drift across swaps).
    fn reset(&mut self, mask: &[bool]) {
        let (u, d) = (self.m.units, self.m.d);
        self.mk.iter_mut().for_each(|v| *v = 0.0);
        self.ck.iter_mut().for_each(|v| *v = 0.0);
        self.cov.iter_mut().for_each(|v| *v = 0.0);
        self.var_k.iter_mut().for_each(|v| *v = 0.0);
        for a in 0..u {
            for b in (0..u).filter(|&b| mask[b]) {
                for (o, v) in self.mk[a * d..(a + 1) * d]
                    .iter_mut()
                    .zip(self.m.pair(a, b))
                {
                    *o += v;
                }
                for (o, v) in self.ck[a * d..(a + 1) * d]
                    .iter_mut()
                    .zip(self.m.pair(b, a))
                {
                    *o += v;
                }
            }
        }
        for a in (0..u).filter(|&a| mask[a]) {
            for j in 0..d {
                self.cov[j] += self.rows[a * d + j];
                self.var_k[j] += self.mk[a * d + j];
            }
        }
    }

    fn objective(&self) -> f64 {
        (0..self.m.d)
            .map(|j| abs_rho(self.cov[j], self.var_k[j], self.var[j]))
            .sum()
    }

    /// F(K − v + u) for kept v and pruned u, in O(d).
    fn swap_objective(&self, u: usize, v: usize) -> f64 {
        let d = self.m.d;
        let (ru, rv) = (
            &self.rows[u * d..(u + 1) * d],
            &self.rows[v * d..(v + 1) * d],
        );
        let (mu, mv) = (&self.mk[u * d..(u + 1) * d], &self.mk[v * d..(v + 1) * d]);
        let (cu, cv) = (&self.ck[u * d..(u + 1) * d], &self.ck[v * d..(v + 1) * d]);
        let (muu, mvv) = (self.m.pair(u, u), self.m.pair(v, v));
        let (muv, mvu) = (self.m.pair(u, v), self.m.pair(v, u));
        let mut f = 0.0;
        for j in 0..d {
            let cov = self.cov[j] - rv[j] + ru[j];
            let var_k = self.var_k[j] - mv[j] - cv[j]
                + mvv[j]
                + (mu[j] - muv[j])
                + (cu[j] - mvu[j])
                + muu[j];
            f += abs_rho(cov, var_k, self.var[j]);
        }
        f
    }
}

/// How GQA constrains a head selection (DESIGN.md section 2, **beyond**).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMode {
    /// The same number of query heads is removed from every KV group; swaps stay in a group.
    /// With G = 1 this is the paper's unconstrained selection. With G = H (MHA) every group
    /// holds one head, so only `n_prune = 0` is valid: prune MHA heads in `KvGroup` mode, where
    /// each group is one head and its k/v heads go with it.
    Uniform,
    /// Whole KV groups are removed (their query heads and the k/v heads).
    KvGroup,
}

/// Outcome of [`select_heads`]. Index lists are sorted ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSelection {
    /// Kept query heads.
    pub kept: Vec<usize>,
    /// Removed query heads.
    pub pruned: Vec<usize>,
    /// Removed KV heads (empty in `Uniform` mode).
    pub pruned_kv_heads: Vec<usize>,
    /// F(kept) after the search.
    pub objective: f64,
    /// F(kept) of the initial score-based selection, before any swap.
    pub initial_objective: f64,
    /// Number of swaps the greedy search applied.
    pub swaps: usize,
}

/// Choose the heads to remove: the `n_prune` highest scores (per group in `Uniform` mode), then
/// if `greedy`, the swap search of Algorithm 1: for each pruned unit u in descending score
/// order, evaluate swapping it with every kept unit v (same KV group in `Uniform` mode) and
/// apply the best swap if it raises F(K). Ties are broken by the lower index.
///
/// `m` holds per-query-head statistics (units = H). `n_prune` counts query heads in `Uniform`
/// mode (a multiple of `num_kv_heads`) and KV groups in `KvGroup` mode.
///
/// Details (DESIGN.md section 2, paper Algorithm 1):
/// * scores are [`HeadPairStats::scores`]; in `Uniform` mode group g holds heads
///   g·(H/G) .. (g+1)·(H/G) and each group loses its n_prune/G highest-scoring heads;
///   in `KvGroup` mode M is aggregated with [`HeadPairStats::group`] and the n_prune
///   highest-scoring groups are removed (no further constraint);
/// * one pass over the initially pruned units, in descending score order (ties: lower index);
///   for each, every currently kept unit v (ascending) is tried and the best swap whose F is
///   strictly greater than the current F is applied (the first such v on exact ties). Each
///   trial costs O(d) from running per-unit sums.
///
/// Errors: `InvalidCount` (n_prune leaves no head, or not a multiple of G; G does not divide H).
///
/// ```rust
/// use slimllm_core::heads::{select_heads, HeadMode, HeadPairStats};
///
/// // Four uncorrelated heads, one output coordinate, contributions of variance 1, 2, 3, 4.
/// let mut data = vec![0.0; 16];
/// for a in 0..4 { data[a * 4 + a] = (a + 1) as f64; }
/// let m = HeadPairStats::from_vec(4, 1, data)?;
/// let sel = select_heads(&m, 2, 2, HeadMode::Uniform, true)?;
/// // one head from each KV group {0, 1} and {2, 3}: the weaker one goes.
/// assert_eq!(sel.pruned, vec![0, 2]);
/// assert_eq!(sel.kept, vec![1, 3]);
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
pub fn select_heads(
    m: &HeadPairStats<'_>,
    n_prune: usize,
    num_kv_heads: usize,
    mode: HeadMode,
    greedy: bool,
) -> Result<HeadSelection> {
    let hh = m.units();
    let g = num_kv_heads;
    if g == 0 || g > hh || hh % g != 0 {
        return Err(SlimError::InvalidCount {
            what: format!("num_kv_heads (must divide num_heads = {hh})"),
            value: g,
            max: hh,
        });
    }
    let per_group = hh / g;
    match mode {
        HeadMode::Uniform => {
            if n_prune % g != 0 || n_prune > hh - g {
                return Err(SlimError::InvalidCount {
                    what: format!(
                        "n_prune (query heads; a multiple of num_kv_heads = {g} leaving a head per group)"
                    ),
                    value: n_prune,
                    max: hh - g,
                });
            }
            let group_of: Vec<usize> = (0..hh).map(|a| a / per_group).collect();
            let quota = vec![n_prune / g; g];
            let r = search(m, &group_of, &quota, greedy);
            let kept: Vec<usize> = (0..hh).filter(|&a| r.mask[a]).collect();
            let pruned: Vec<usize> = (0..hh).filter(|&a| !r.mask[a]).collect();
            Ok(HeadSelection {
                kept,
                pruned,
                pruned_kv_heads: Vec::new(),
                objective: r.objective,
                initial_objective: r.initial_objective,
                swaps: r.swaps,
            })
        }
        HeadMode::KvGroup => {
            if n_prune >= g {
                return Err(SlimError::InvalidCount {
                    what: "n_prune (KV groups; must leave one)".into(),
                    value: n_prune,
                    max: g - 1,
                });
            }
            let grouped = m.group(g)?;
            let r = search(&grouped, &vec![0; g], &[n_prune], greedy);
            let kept: Vec<usize> = (0..hh).filter(|&a| r.mask[a / per_group]).collect();
            let pruned: Vec<usize> = (0..hh).filter(|&a| !r.mask[a / per_group]).collect();
            let pruned_kv_heads = (0..g).filter(|&k| !r.mask[k]).collect();
            Ok(HeadSelection {
                kept,
                pruned,
                pruned_kv_heads,
                objective: r.objective,
                initial_objective: r.initial_objective,
                swaps: r.swaps,
            })
        }
    }
}

struct SearchResult {
    mask: Vec<bool>,
    objective: f64,
    initial_objective: f64,
    swaps: usize,
}

/// Score-based selection plus the optional one-pass swap search on the units of `m`.
/// `group_of[u]` is the constraint group of unit u; `quota[g]` the units pruned in group g.
fn search(
    m: &HeadPairStats<'_>,
    group_of: &[usize],
    quota: &[usize],
    greedy: bool,
) -> SearchResult {
    let u = m.units();
    let scores = m.scores();
    // descending score, ties by lower index
    let mut order: Vec<usize> = (0..u).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut mask = vec![true; u];
    let mut taken = vec![0usize; quota.len()];
    let mut pruned_order = Vec::new();
    for &a in &order {
        let grp = group_of[a];
        if taken[grp] < quota[grp] {
            taken[grp] += 1;
            mask[a] = false;
            pruned_order.push(a);
        }
    }
    let mut sums = SetSums::new(m, &mask);
    let initial_objective = sums.objective();
    let mut current = initial_objective;
    let mut swaps = 0;
    if greedy {
        for &p in &pruned_order {
            let mut best: Option<(usize, f64)> = None;
            let mut best_f = current;
            for v in (0..u).filter(|&v| mask[v] && group_of[v] == group_of[p]) {
                let f = sums.swap_objective(p, v);
                if f > best_f {
                    best_f = f;
                    best = Some((v, f));
                }
            }
            if let Some((v, _)) = best {
                mask[p] = true;
                mask[v] = false;
                swaps += 1;
                sums.reset(&mask);
                current = sums.objective();
            }
        }
    }
    SearchResult {
        mask,
        objective: current,
        initial_objective,
        swaps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_products_equal_unchunked() {
        let (hh, h, d) = (7, 3, 5);
        let n = hh * h;
        // a symmetric positive semi-definite "covariance" and a w_o with simple entries
        let a = Mat::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.4);
        let cov = a.as_ref() * a.as_ref().transpose();
        let w_o = Mat::from_fn(d, n, |j, i| ((j * 5 + i * 2) % 9) as f64 / 9.0 - 0.5);
        let full = HeadPairStats::compute(cov.as_ref(), w_o.as_ref(), hh, Par::Seq).unwrap();
        for chunk in [1, 2, 3, 7, 100] {
            let c = HeadPairStats::compute_chunked(
                cov.as_ref(),
                w_o.as_ref(),
                hh,
                Par::Seq,
                Some(chunk),
            )
            .unwrap();
            for (x, y) in c.as_slice().iter().zip(full.as_slice()) {
                assert!((x - y).abs() < 1e-12, "chunk {chunk}");
            }
        }
        // M is symmetric in (a, b)
        for a in 0..hh {
            for b in 0..hh {
                assert_eq!(full.pair(a, b), full.pair(b, a));
            }
        }
    }

    #[test]
    fn abs_rho_guards() {
        assert_eq!(abs_rho(1.0, 0.0, 1.0), 0.0);
        assert_eq!(abs_rho(1.0, 1.0, -1e-300), 0.0);
        assert_eq!(abs_rho(-2.0, 4.0, 1.0), 1.0);
    }
}
