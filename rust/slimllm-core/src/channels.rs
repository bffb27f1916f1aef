//! MLP intermediate-channel ranking (DESIGN.md section 3; paper section 3.3).
//!
//! SwiGLU MLP y = W_down (act(W_gate x) ⊙ W_up x); F intermediate channels, d hidden size.
//! A channel c is scored by how much input energy its gate and up rows pick up and how much its
//! down column feeds the principal directions of the output:
//! score_c = I_gate[c] + I_up[c] + I_down[c] (low = prune), see [`ChannelScores`].

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Result, SlimError};
use crate::moments::{check_finite, check_finite_slice, lines, shape_mismatch, Lines};

/// The three terms of every channel's score; `total()` is what ranks channels (low = prune).
/// Each vector has length F; the terms are in output units × sqrt(token count).
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
        self.gate
            .iter()
            .zip(&self.up)
            .zip(&self.down)
            .map(|((g, u), d)| g + u + d)
            .collect()
    }
}

#[inline]
fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn check_nonneg(x: &[f64], what: &str) -> Result<()> {
    if let Some(&v) = x.iter().find(|v| **v < 0.0) {
        return Err(SlimError::InvalidRatio {
            what: what.to_string(),
            value: v,
            allowed: ">= 0 (a sum of squares)".into(),
        });
    }
    Ok(())
}

/// Principal components of the MLP output used by [`channel_scores`] (DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPca {
    /// Eigenvectors V (d × d), column k belongs to `values[k]`; orthonormal.
    pub vectors: Mat<f64>,
    /// Eigenvalues λ (d), nondecreasing.
    pub values: Vec<f64>,
    /// w_k = sigmoid(|λ_k| / mean|λ|), all 0.5 when mean|λ| = 0 (d).
    pub weights: Vec<f64>,
}

/// Eigen-decomposition C = V diag(λ) Vᵀ of the symmetric output covariance `y_cov` (d × d,
/// lower triangle read) by faer's self-adjoint solver (DESIGN.md section 7: not the general
/// solver of the authors' code), and the PCA weights w_k = sigmoid(|λ_k| / mean|λ|).
/// `par` is passed to faer. Errors: `ShapeMismatch` (not square), `NonFinite` (also used
/// if the solver does not converge).
pub fn output_pca(y_cov: MatRef<'_, f64>, par: Par) -> Result<OutputPca> {
    if y_cov.nrows() != y_cov.ncols() {
        return Err(shape_mismatch(
            "y_cov columns (square)",
            y_cov.nrows(),
            y_cov.ncols(),
        ));
    }
    check_finite(y_cov, "y_cov")?;
    let (vectors, weights, values) = pca_weights(y_cov, par)?;
    Ok(OutputPca {
        vectors,
        values,
        weights,
    })
}

/// (V, w, λ) of [`output_pca`], inputs already checked.
fn pca_weights(y_cov: MatRef<'_, f64>, par: Par) -> Result<(Mat<f64>, Vec<f64>, Vec<f64>)> {
    let d = y_cov.nrows();
    let mut v = Mat::<f64>::zeros(d, d);
    let mut s = Diag::<f64>::zeros(d);
    let mut mem = MemBuffer::new(evd::self_adjoint_evd_scratch::<f64>(
        d,
        ComputeEigenvectors::Yes,
        par,
        Default::default(),
    ));
    evd::self_adjoint_evd(
        y_cov,
        s.as_mut(),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|_| SlimError::NonFinite {
        // The only failure of the solver is non-convergence, which in practice means values
        // that are not usable numbers (inputs were checked finite; overflow is possible).
        what: "y_cov (eigendecomposition did not converge)".into(),
        row: 0,
        col: 0,
    })?;
    let lambda: Vec<f64> = (0..d).map(|k| s.column_vector()[k]).collect();
    let mean_abs = if d == 0 {
        0.0
    } else {
        lambda.iter().map(|l| l.abs()).sum::<f64>() / d as f64
    };
    let w = lambda
        .iter()
        .map(|l| {
            if mean_abs > 0.0 {
                sigmoid(l.abs() / mean_abs)
            } else {
                0.5
            }
        })
        .collect();
    Ok((v, w, lambda))
}

/// ‖W[c, :] ⊙ l‖₂ for every row c of `w`, reading `w` in its memory order.
fn weighted_row_norms(w: MatRef<'_, f64>, l: &[f64], rayon: bool) -> Vec<f64> {
    let mut buf = Vec::new();
    let norm = |row: &[f64]| -> f64 {
        row.iter()
            .zip(l)
            .map(|(x, s)| (x * s) * (x * s))
            .sum::<f64>()
            .sqrt()
    };
    match lines(w, &mut buf) {
        Lines::Rows(rows) => {
            if rayon {
                rows.par_iter().map(|r| norm(r)).collect()
            } else {
                rows.iter().map(|r| norm(r)).collect()
            }
        }
        Lines::Cols(cols) => {
            let mut acc = vec![0.0; w.nrows()];
            for (col, s) in cols.iter().zip(l) {
                for (a, x) in acc.iter_mut().zip(col.iter()) {
                    let t = x * s;
                    *a += t * t;
                }
            }
            acc.iter().map(|v| v.sqrt()).collect()
        }
    }
}

/// Score every channel (DESIGN.md section 3, paper section 3.3).
///
/// Inputs: `in_sumsq` (d): Σ x_in² per hidden dimension; `act_sumsq` (F): Σ a² per channel;
/// `y_cov` (d × d): covariance of the MLP output (symmetric; decomposed with a self-adjoint
/// eigensolver, lower triangle read); `w_gate`, `w_up` (F × d); `w_down` (d × F).
/// l_in = sqrt(in_sumsq), l_a = sqrt(act_sumsq). If mean|λ| = 0 every w_k is sigmoid(0) = 0.5.
///
/// Formulas: I_gate[c] = sqrt(Σ_i (W_gate[c,i] l_in[i])²), I_up likewise, and with
/// P = Vᵀ W_down (d × F, one matrix product), I_down[c] = l_a[c] · sqrt(Σ_k (|P[k,c]| w_k)²).
/// Cost: one d × d eigendecomposition plus d²F multiply-adds; `par` is passed to faer and
/// splits the per-channel loops with rayon.
///
/// Errors: `ShapeMismatch`, `NonFinite`, `InvalidRatio` (a negative sum of squares).
///
/// ```rust
/// use faer::{mat, Mat, Par};
/// use slimllm_core::channels::channel_scores;
///
/// // d = 2, F = 1: input norms (3, 4), output covariance zero (all PCA weights 0.5).
/// let s = channel_scores(
///     &[9.0, 16.0], &[4.0], Mat::<f64>::zeros(2, 2).as_ref(),
///     mat![[1.0, 1.0]].as_ref(), mat![[0.0, 1.0]].as_ref(), mat![[1.0], [0.0]].as_ref(),
///     Par::Seq,
/// )?;
/// assert!((s.gate[0] - 5.0).abs() < 1e-12);
/// assert!((s.up[0] - 4.0).abs() < 1e-12);
/// assert!((s.down[0] - 2.0 * 0.5).abs() < 1e-12); // l_a = 2, ‖W_down[:,0]‖ = 1, w = 0.5
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
pub fn channel_scores(
    in_sumsq: &[f64],
    act_sumsq: &[f64],
    y_cov: MatRef<'_, f64>,
    w_gate: MatRef<'_, f64>,
    w_up: MatRef<'_, f64>,
    w_down: MatRef<'_, f64>,
    par: Par,
) -> Result<ChannelScores> {
    let d = in_sumsq.len();
    let f = act_sumsq.len();
    let check = |what: &str, got: (usize, usize), want: (usize, usize)| -> Result<()> {
        if got.0 != want.0 {
            return Err(shape_mismatch(format!("{what} rows"), want.0, got.0));
        }
        if got.1 != want.1 {
            return Err(shape_mismatch(format!("{what} columns"), want.1, got.1));
        }
        Ok(())
    };
    check("y_cov", y_cov.shape(), (d, d))?;
    check("w_gate", w_gate.shape(), (f, d))?;
    check("w_up", w_up.shape(), (f, d))?;
    check("w_down", w_down.shape(), (d, f))?;
    check_finite_slice(in_sumsq, "in_sumsq")?;
    check_finite_slice(act_sumsq, "act_sumsq")?;
    check_finite(y_cov, "y_cov")?;
    check_finite(w_gate, "w_gate")?;
    check_finite(w_up, "w_up")?;
    check_finite(w_down, "w_down")?;
    check_nonneg(in_sumsq, "in_sumsq")?;
    check_nonneg(act_sumsq, "act_sumsq")?;

    let l_in: Vec<f64> = in_sumsq.iter().map(|v| v.sqrt()).collect();
    let l_a: Vec<f64> = act_sumsq.iter().map(|v| v.sqrt()).collect();
    let rayon = matches!(par, Par::Rayon(_));

    let gate = weighted_row_norms(w_gate, &l_in, rayon);
    let up = weighted_row_norms(w_up, &l_in, rayon);

    let (v, w, _lambda) = pca_weights(y_cov, par)?;
    let mut p = Mat::<f64>::zeros(d, f);
    matmul(p.as_mut(), Accum::Replace, v.transpose(), w_down, 1.0, par);
    let down_of = |c: usize| -> f64 {
        let col = p.col(c).try_as_col_major().unwrap().as_slice();
        let mut acc = 0.0;
        for (pk, wk) in col.iter().zip(&w) {
            let t = pk.abs() * wk;
            acc += t * t;
        }
        l_a[c] * acc.sqrt()
    };
    let down: Vec<f64> = if rayon {
        (0..f).into_par_iter().map(down_of).collect()
    } else {
        (0..f).map(down_of).collect()
    };
    Ok(ChannelScores { gate, up, down })
}

/// Channels to remove, sorted ascending: order channels by ascending score (ties: lower index
/// first), skip the lowest `round_half_even(protect_lowest · F)` (the paper's 1% quirk; fewer if
/// fewer channels remain), remove the next `n_prune`.
///
/// "Fewer if fewer channels remain": the protected count is min(round(protect_lowest·F),
/// F − n_prune), so exactly `n_prune` channels are always returned.
///
/// Errors: `InvalidCount` if `n_prune >= F`, `InvalidRatio` if `protect_lowest` not in [0, 1),
/// `NonFinite`.
///
/// ```rust
/// use slimllm_core::channels::select_channels;
///
/// let scores = [0.5, 0.1, 0.3, 0.1, 0.9];
/// assert_eq!(select_channels(&scores, 2, 0.0)?, vec![1, 3]);
/// // protect round(0.3 * 5) = round(1.5) = 2 lowest (channels 1 and 3), prune the next two
/// assert_eq!(select_channels(&scores, 2, 0.3)?, vec![0, 2]);
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
pub fn select_channels(scores: &[f64], n_prune: usize, protect_lowest: f64) -> Result<Vec<usize>> {
    let f = scores.len();
    if !(0.0..1.0).contains(&protect_lowest) {
        return Err(SlimError::InvalidRatio {
            what: "protect_lowest".into(),
            value: protect_lowest,
            allowed: "[0, 1)".into(),
        });
    }
    if n_prune >= f {
        return Err(SlimError::InvalidCount {
            what: "n_prune (channels; must leave one)".into(),
            value: n_prune,
            max: f.saturating_sub(1),
        });
    }
    check_finite_slice(scores, "scores")?;
    let mut order: Vec<usize> = (0..f).collect();
    // Finite values: partial_cmp is total here (and treats -0.0 == 0.0).
    order.sort_by(|&a, &b| {
        scores[a]
            .partial_cmp(&scores[b])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let protect = ((protect_lowest * f as f64).round_ties_even() as usize).min(f - n_prune);
    let mut out = order[protect..protect + n_prune].to_vec();
    out.sort_unstable();
    Ok(out)
}
