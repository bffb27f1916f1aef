//! Recovery of a pruned output projection (DESIGN.md sections 2 and 3, "Recovery" and "ridge").
//!
//! All fits are of bias-free outputs y = W x; a caller whose layer had a bias b adds b to the
//! returned bias.
//!
//! * [`affine_fit_heads`] / [`affine_from_paired`]: the paper's per-coordinate least-squares
//!   fit y_j ≈ α_j y_K,j + β_j (paper default). Apply it by scaling row j of the pruned
//!   weight by α_j and adding β_j to the output.
//! * [`ridge_reconstruct`]: **beyond** the paper, a full least-squares re-fit of the pruned
//!   weight on the kept inputs with a ridge penalty.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::matmul;
use faer::{Accum, Conj, Mat, MatRef, Par};

use crate::error::{Result, SlimError};
use crate::heads::{index_mask, HeadPairStats};
use crate::moments::{check_finite, shape_mismatch, Moments, PairedMoments};

/// Per-output-coordinate least-squares fit y_j ≈ scale_j · y_K,j + bias_j.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineFit {
    /// α_j = cov(y_K,j, y_j) / var(y_K,j), 1 where var(y_K,j) = 0. Length d.
    pub scale: Vec<f64>,
    /// β_j = mean(y_j) − α_j mean(y_K,j). Length d.
    pub bias: Vec<f64>,
}

/// The one closed form of both affine fits: per coordinate,
/// α = cov(y_K, y) / var(y_K) (1 where var(y_K) ≤ 0), β = mean(y) − α mean(y_K).
fn affine_from_stats(mean_k: &[f64], mean_full: &[f64], var_k: &[f64], cov: &[f64]) -> AffineFit {
    let d = mean_k.len();
    let mut scale = Vec::with_capacity(d);
    let mut bias = Vec::with_capacity(d);
    for j in 0..d {
        let alpha = if var_k[j] > 0.0 {
            cov[j] / var_k[j]
        } else {
            1.0
        };
        scale.push(alpha);
        bias.push(mean_full[j] - alpha * mean_k[j]);
    }
    AffineFit { scale, bias }
}

/// Affine fit of o_proj after head pruning, closed form from the moments of the o_proj input
/// (means μ = s/n), `w_o` (d × D) and the head-pair statistics `m` (units = H) of the same
/// input; `kept` lists kept query heads. No second pass over the data.
///
/// Per output coordinate j (DESIGN.md section 2, "Recovery"): mean(y_j) = W_o[j, :]·μ,
/// mean(y_K,j) = Σ over the kept heads' columns i of W_o[j, i] μ_i,
/// cov(y_K,j, y_j) = Σ_{a∈K} Σ_b M[a,b,j], var(y_K,j) = Σ_{a,b∈K} M[a,b,j], then
/// α_j = cov / var (1 if var = 0), β_j = mean(y_j) − α_j mean(y_K,j).
/// The pruned layer becomes y' = diag(α) W_o[:, K-columns] x_K + β.
///
/// Errors: `EmptyAccumulator`, `ShapeMismatch`, `InvalidCount` (bad head index), `NonFinite`
/// (w_o).
pub fn affine_fit_heads(
    moments: &Moments,
    w_o: MatRef<'_, f64>,
    m: &HeadPairStats<'_>,
    kept: &[usize],
) -> Result<AffineFit> {
    let (d, big_d) = w_o.shape();
    if moments.dim() != big_d {
        return Err(shape_mismatch(
            "moments dim (= w_o columns D)",
            big_d,
            moments.dim(),
        ));
    }
    if m.out_dim() != d {
        return Err(shape_mismatch(
            "head-pair stats out_dim (= w_o rows d)",
            d,
            m.out_dim(),
        ));
    }
    let hh = m.units();
    if hh == 0 || big_d % hh != 0 {
        return Err(shape_mismatch(
            format!("w_o columns (D, a multiple of the {hh} units of m)"),
            big_d.div_ceil(hh.max(1)) * hh.max(1),
            big_d,
        ));
    }
    let h = big_d / hh;
    let mask = index_mask(hh, kept, "kept head")?;
    check_finite(w_o, "w_o")?;
    let mu = moments.mean()?;

    // Per-head partial means P[j, a] = Σ_{i∈a} W_o[j, i] μ_i: one small product per head.
    let mu_m = Mat::from_fn(big_d, 1, |i, _| mu[i]);
    let mut part = Mat::<f64>::zeros(d, hh);
    for a in 0..hh {
        matmul(
            part.as_mut().subcols_mut(a, 1),
            Accum::Replace,
            w_o.subcols(a * h, h),
            mu_m.as_ref().subrows(a * h, h),
            1.0,
            Par::Seq,
        );
    }
    let mut mean_full = vec![0.0; d];
    let mut mean_k = vec![0.0; d];
    for (a, &keep) in mask.iter().enumerate() {
        let pa = part.col(a).try_as_col_major().unwrap().as_slice();
        mean_full.iter_mut().zip(pa).for_each(|(m, v)| *m += v);
        if keep {
            mean_k.iter_mut().zip(pa).for_each(|(m, v)| *m += v);
        }
    }
    let mut cov = vec![0.0; d];
    let mut var_k = vec![0.0; d];
    for a in (0..hh).filter(|&a| mask[a]) {
        for (b, &keep_b) in mask.iter().enumerate() {
            let mab = m.pair(a, b);
            cov.iter_mut().zip(mab).for_each(|(c, v)| *c += v);
            if keep_b {
                var_k.iter_mut().zip(mab).for_each(|(c, v)| *c += v);
            }
        }
    }
    Ok(affine_from_stats(&mean_k, &mean_full, &var_k, &cov))
}

/// Affine fit from paired per-coordinate statistics of pruned and full outputs (MLP recovery,
/// DESIGN.md section 3): with p the pruned and f the full output,
/// α_j = cov(p_j, f_j) / var(p_j) (1 if var(p_j) = 0), β_j = mean(f_j) − α_j mean(p_j).
/// Errors: `EmptyAccumulator`.
///
/// ```rust
/// use faer::mat;
/// use slimllm_core::moments::PairedMoments;
/// use slimllm_core::recovery::affine_from_paired;
///
/// let mut pm = PairedMoments::new(1);
/// // full = 2 * pruned + 1 exactly
/// pm.update(mat![[0.0f64], [1.0], [3.0]].as_ref(), mat![[1.0f64], [3.0], [7.0]].as_ref())?;
/// let fit = affine_from_paired(&pm)?;
/// assert!((fit.scale[0] - 2.0).abs() < 1e-12 && (fit.bias[0] - 1.0).abs() < 1e-12);
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
pub fn affine_from_paired(paired: &PairedMoments) -> Result<AffineFit> {
    let c = paired.centred()?;
    Ok(affine_from_stats(&c.mean_p, &c.mean_f, &c.var_p, &c.cov_pf))
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
///
/// C is the population covariance of x ([`Moments::covariance`]); the objective is per token
/// (divided by n), so λ is on the scale of the input variances (DESIGN.md section 2,
/// **beyond**). Cost: |K|·D_in·d_out multiply-adds for C_K,: Wᵀ plus a |K|³/3 Cholesky;
/// `par` is passed to faer. With damp = 0 this is ordinary least squares (C_KK must then be
/// positive definite, else `NotPositiveDefinite` with the failing pivot).
///
/// ```rust
/// use faer::{mat, Par};
/// use slimllm_core::moments::Moments;
/// use slimllm_core::recovery::ridge_reconstruct;
///
/// // x1 = x0 + 1 on every token: dropping x1 is repaired exactly by W' = 2, b = 1.
/// let mut mo = Moments::new(2);
/// mo.update(mat![[0.0f64, 1.0], [1.0, 2.0], [3.0, 4.0]].as_ref(), Par::Seq)?;
/// let r = ridge_reconstruct(&mo, mat![[1.0, 1.0]].as_ref(), &[0], 0.0, Par::Seq)?;
/// assert!((r.weight[(0, 0)] - 2.0).abs() < 1e-12 && (r.bias[0] - 1.0).abs() < 1e-12);
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
pub fn ridge_reconstruct(
    moments: &Moments,
    w: MatRef<'_, f64>,
    kept: &[usize],
    damp: f64,
    par: Par,
) -> Result<Reconstruction> {
    let (d_out, d_in) = w.shape();
    if moments.dim() != d_in {
        return Err(shape_mismatch(
            "moments dim (= w columns)",
            d_in,
            moments.dim(),
        ));
    }
    index_mask(d_in, kept, "kept column")?;
    if !(damp.is_finite() && damp >= 0.0) {
        return Err(SlimError::InvalidRatio {
            what: "damp".into(),
            value: damp,
            allowed: "finite, >= 0".into(),
        });
    }
    check_finite(w, "w")?;
    let mu = moments.mean()?;
    let k = kept.len();

    // C[K, :] (k × D_in), then the right-hand side C_K,: Wᵀ (k × d_out).
    let c_k = moments.covariance_rows(kept)?;
    let mut rhs = Mat::<f64>::zeros(k, d_out);
    matmul(
        rhs.as_mut(),
        Accum::Replace,
        c_k.as_ref(),
        w.transpose(),
        1.0,
        par,
    );

    // A = C_KK + λ I.
    let mut a = Mat::from_fn(k, k, |r, c| c_k[(r, kept[c])]);
    let mean_diag = if k == 0 {
        0.0
    } else {
        (0..k).map(|r| a[(r, r)]).sum::<f64>() / k as f64
    };
    let lambda = if mean_diag == 0.0 {
        damp
    } else {
        damp * mean_diag
    };
    for r in 0..k {
        a[(r, r)] += lambda;
    }
    let mut mem = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
        k,
        par,
        Default::default(),
    ));
    llt::factor::cholesky_in_place(
        a.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| match e {
        llt::factor::LltError::NonPositivePivot { index } => SlimError::NotPositiveDefinite {
            what: format!("C_KK + lambda I (lambda = {lambda:e})"),
            dim: k,
            pivot: index,
        },
    })?;
    let mut mem = MemBuffer::new(llt::solve::solve_in_place_scratch::<f64>(k, d_out, par));
    llt::solve::solve_in_place_with_conj(
        a.as_ref(),
        Conj::No,
        rhs.as_mut(),
        par,
        MemStack::new(&mut mem),
    );
    // rhs now holds W'ᵀ (k × d_out).
    let weight: Mat<f64> = rhs.transpose().to_owned();
    // b = W μ − W' μ_K
    let mu_m = Mat::from_fn(d_in, 1, |i, _| mu[i]);
    let mu_k = Mat::from_fn(k, 1, |c, _| mu[kept[c]]);
    let mut b = Mat::<f64>::zeros(d_out, 1);
    matmul(b.as_mut(), Accum::Replace, w, mu_m.as_ref(), 1.0, par);
    matmul(
        b.as_mut(),
        Accum::Add,
        weight.as_ref(),
        mu_k.as_ref(),
        -1.0,
        par,
    );
    let bias: Vec<f64> = (0..d_out).map(|j| b[(j, 0)]).collect();
    Ok(Reconstruction { weight, bias })
}
