//! MLP intermediate-channel ranking (DESIGN.md section 3; paper section 3.3).
//!
//! SwiGLU MLP y = W_down (act(W_gate x) ⊙ W_up x); F intermediate channels, d hidden size.

use faer::{MatRef, Par};

use crate::error::Result;

/// The three terms of every channel's score; `total()` is what ranks channels (low = prune).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelScores {
    /// I_gate[c] = ‖W_gate[c, :] ⊙ l_in‖₂.
    pub gate: Vec<f64>,
    /// I_up[c] = ‖W_up[c, :] ⊙ l_in‖₂.
    pub up: Vec<f64>,
    /// I_down[c] = l_a[c] · ‖ |W_down[:, c]ᵀ V| ⊙ w ‖₂ with V, λ the eigenvectors/values of the
    /// output covariance and w_k = sigmoid(|λ_k| / mean|λ|).
    pub down: Vec<f64>,
}

impl ChannelScores {
    /// gate + up + down per channel.
    pub fn total(&self) -> Vec<f64> {
        todo!()
    }
}

/// Score every channel. `in_sumsq` (d): Σ x_in² per hidden dimension; `act_sumsq` (F):
/// Σ a² per channel; `y_cov` (d × d): covariance of the MLP output (symmetric; decomposed with
/// a self-adjoint eigensolver); `w_gate`, `w_up` (F × d); `w_down` (d × F).
/// l_in = sqrt(in_sumsq), l_a = sqrt(act_sumsq). If mean|λ| = 0 every w_k is sigmoid(0) = 0.5.
/// Errors: `ShapeMismatch`, `NonFinite`.
pub fn channel_scores(
    in_sumsq: &[f64],
    act_sumsq: &[f64],
    y_cov: MatRef<'_, f64>,
    w_gate: MatRef<'_, f64>,
    w_up: MatRef<'_, f64>,
    w_down: MatRef<'_, f64>,
    par: Par,
) -> Result<ChannelScores> {
    todo!()
}

/// Channels to remove, sorted ascending: order channels by ascending score (ties: lower index
/// first), skip the lowest `round_half_even(protect_lowest · F)` (the paper's 1% quirk; fewer if
/// fewer channels remain), remove the next `n_prune`.
/// Errors: `InvalidCount` if `n_prune >= F`, `InvalidRatio` if `protect_lowest` not in [0, 1),
/// `NonFinite`.
pub fn select_channels(scores: &[f64], n_prune: usize, protect_lowest: f64) -> Result<Vec<usize>> {
    todo!()
}
