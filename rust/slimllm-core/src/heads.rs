//! Attention-head ranking and selection (DESIGN.md section 2; paper section 3.2, Algorithm 1).
//!
//! Notation: H query heads of dimension h, D = H·h, d output (hidden) size, G key/value heads.
//! `w_o` is the o_proj weight, shape (d, D); head a owns its columns a·h .. (a+1)·h.

use faer::{MatRef, Par};

use crate::error::Result;

/// M[a, b, j] = W_o[j, a]ᵀ C[a, b] W_o[j, b] for every pair of units (heads, or KV groups after
/// [`HeadPairStats::group`]) and every output coordinate j; stored row-major as (units, units, d).
///
/// For a kept set K: cov(y_K,j, y_j) = Σ_{a∈K} Σ_b M[a,b,j]; var(y_K,j) = Σ_{a,b∈K} M[a,b,j];
/// var(y_j) = Σ_{a,b} M[a,b,j].
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPairStats {
    /* fields: implementer's choice */
}

impl HeadPairStats {
    /// Compute M from the covariance `cov` (D × D) of the o_proj input and `w_o` (d × D).
    /// Errors: `ShapeMismatch` (cov not square, cov vs w_o columns, D not divisible by
    /// `num_heads`), `InvalidCount` for `num_heads == 0`, `NonFinite`.
    pub fn compute(cov: MatRef<'_, f64>, w_o: MatRef<'_, f64>, num_heads: usize, par: Par) -> Result<Self> {
        todo!()
    }
    /// Wrap an existing row-major (units, units, d) array. Errors: `ShapeMismatch`, `NonFinite`.
    pub fn from_vec(units: usize, d: usize, data: Vec<f64>) -> Result<Self> {
        todo!()
    }
    /// Number of units (heads or groups).
    pub fn units(&self) -> usize {
        todo!()
    }
    /// Output dimension d.
    pub fn out_dim(&self) -> usize {
        todo!()
    }
    /// Row-major (units, units, d) data.
    pub fn as_slice(&self) -> &[f64] {
        todo!()
    }
    /// Sum consecutive blocks of `units / groups` units into one (heads -> KV groups).
    /// Errors: `InvalidCount` / `ShapeMismatch` when `groups` does not divide `units`.
    pub fn group(&self, groups: usize) -> Result<HeadPairStats> {
        todo!()
    }
    /// Pearson objective F(K) = Σ_j |ρ_j(K)|, ρ_j = cov(y_K,j, y_j) / sqrt(var(y_K,j) var(y_j));
    /// a coordinate with either variance 0 contributes 0. Errors: `InvalidCount` for an index
    /// out of range or repeated.
    pub fn objective(&self, kept: &[usize]) -> Result<f64> {
        todo!()
    }
    /// Paper head score: score_a = F(all units except a). High score = prune first.
    pub fn scores(&self) -> Vec<f64> {
        todo!()
    }
}

/// How GQA constrains a head selection (DESIGN.md section 2, **beyond**).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMode {
    /// The same number of query heads is removed from every KV group; swaps stay in a group.
    /// With one head per group (or G = H, MHA) this is the paper's unconstrained selection.
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
/// Errors: `InvalidCount` (n_prune leaves no head, or not a multiple of G; G does not divide H).
pub fn select_heads(
    m: &HeadPairStats,
    n_prune: usize,
    num_kv_heads: usize,
    mode: HeadMode,
    greedy: bool,
) -> Result<HeadSelection> {
    todo!()
}
