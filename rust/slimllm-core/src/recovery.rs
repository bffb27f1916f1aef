//! Recovery of a pruned output projection (DESIGN.md sections 2 and 3, "Recovery" and "ridge").
//!
//! All fits are of bias-free outputs y = W x; a caller whose layer had a bias b adds b to the
//! returned bias.

use faer::{Mat, MatRef, Par};

use crate::error::Result;
use crate::heads::HeadPairStats;
use crate::moments::{Moments, PairedMoments};

/// Per-output-coordinate least-squares fit y_j ≈ scale_j · y_K,j + bias_j.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineFit {
    /// α_j = cov(y_K,j, y_j) / var(y_K,j), 1 where var(y_K,j) = 0. Length d.
    pub scale: Vec<f64>,
    /// β_j = mean(y_j) − α_j mean(y_K,j). Length d.
    pub bias: Vec<f64>,
}

/// Affine fit of o_proj after head pruning, closed form from the moments of the o_proj input
/// (means μ = s/n), `w_o` (d × D) and the head-pair statistics `m` (units = H) of the same
/// input; `kept` lists kept query heads. No second pass over the data.
/// Errors: `EmptyAccumulator`, `ShapeMismatch`, `InvalidCount` (bad head index).
pub fn affine_fit_heads(
    moments: &Moments,
    w_o: MatRef<'_, f64>,
    m: &HeadPairStats,
    kept: &[usize],
) -> Result<AffineFit> {
    todo!()
}

/// Affine fit from paired per-coordinate statistics of pruned and full outputs (MLP recovery).
/// Errors: `EmptyAccumulator`.
pub fn affine_from_paired(paired: &PairedMoments) -> Result<AffineFit> {
    todo!()
}

/// Ridge reconstruction of an output matrix restricted to kept input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconstruction {
    /// W' (d_out × |K|), columns in the order of `kept`.
    pub weight: Mat<f64>,
    /// b (d_out) = W μ − W' μ_K.
    pub bias: Vec<f64>,
}

/// W' = argmin Σ‖W' x_K + b − W x‖² + λ‖W'‖² over the rows seen by `moments` (input x of
/// dimension D_in, `w` of shape d_out × D_in), in closed form:
/// W'ᵀ = (C_KK + λ I)⁻¹ C_K,: Wᵀ, b = W μ − W' μ_K, with λ = damp · mean(diag C_KK)
/// (λ = damp when that mean is 0, so constant inputs give W' = 0, b = mean output).
/// Solved by Cholesky. Errors: `EmptyAccumulator`, `ShapeMismatch`, `InvalidCount` (bad or
/// repeated column), `InvalidRatio` (damp < 0 or not finite), `NotPositiveDefinite`.
pub fn ridge_reconstruct(
    moments: &Moments,
    w: MatRef<'_, f64>,
    kept: &[usize],
    damp: f64,
    par: Par,
) -> Result<Reconstruction> {
    todo!()
}
