//! Affine and ridge recovery against least squares on materialised data.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas
mod common;

use common::*;
use faer::{Mat, Par};
use slimllm_core::heads::HeadPairStats;
use slimllm_core::moments::{Moments, PairedMoments};
use slimllm_core::recovery::{affine_fit_heads, affine_from_paired, ridge_reconstruct};
use slimllm_core::SlimError;

/// 1-D least squares y ≈ α x + β by two-pass formulas; α = 1 where var(x) = 0.
fn fit_1d(x: &[f64], y: &[f64]) -> (f64, f64) {
    let v = cov2(x, x);
    let a = if v > 0.0 { cov2(x, y) / v } else { 1.0 };
    (a, mean1(y) - a * mean1(x))
}

/// Columns of the kept heads.
fn kept_cols(kept: &[usize], h: usize) -> Vec<usize> {
    kept.iter().flat_map(|&a| a * h..(a + 1) * h).collect()
}

fn select_cols(x: &Mat<f64>, cols: &[usize]) -> Mat<f64> {
    Mat::from_fn(x.nrows(), cols.len(), |t, c| x[(t, cols[c])])
}

#[test]
fn affine_fit_heads_matches_per_coordinate_regression() {
    let mut r = rng(31);
    let (heads, h, d, n) = (6, 3, 9, 500);
    let x = correlated(&mut r, n, heads * h, 2.0);
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
    let y = apply(&x, &w_o);
    for kept in [vec![0usize, 1, 2, 3, 4, 5], vec![1, 3, 4], vec![5]] {
        let cols = kept_cols(&kept, h);
        let yk = apply(&select_cols(&x, &cols), &select_cols(&w_o, &cols));
        let fit = affine_fit_heads(&mo, w_o.as_ref(), &m, &kept).unwrap();
        for j in 0..d {
            let (a, b) = fit_1d(&col(&yk, j), &col(&y, j));
            assert!(
                (fit.scale[j] - a).abs() < 1e-10 * n as f64 * a.abs().max(1.0),
                "alpha[{j}]"
            );
            assert!(
                (fit.bias[j] - b).abs() < 1e-10 * n as f64 * b.abs().max(1.0),
                "beta[{j}]"
            );
        }
        if kept.len() == heads {
            for j in 0..d {
                assert!((fit.scale[j] - 1.0).abs() < 1e-12 && fit.bias[j].abs() < 1e-10);
            }
        }
    }
}

#[test]
fn affine_zero_variance_gives_unit_scale_and_mean_difference() {
    let mut r = rng(32);
    let (heads, h, d, n) = (3, 2, 4, 100);
    let mut x = correlated(&mut r, n, heads * h, 1.0);
    // head 0's inputs are constant: y_K of K = {0} has zero variance on every coordinate.
    for t in 0..n {
        x[(t, 0)] = 0.7;
        x[(t, 1)] = -1.3;
    }
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
    let fit = affine_fit_heads(&mo, w_o.as_ref(), &m, &[0]).unwrap();
    let y = apply(&x, &w_o);
    for j in 0..d {
        assert_eq!(fit.scale[j], 1.0);
        let yk = 0.7 * w_o[(j, 0)] - 1.3 * w_o[(j, 1)];
        assert!((fit.bias[j] - (mean1(&col(&y, j)) - yk)).abs() < 1e-12 * n as f64);
    }
    // empty kept set: y_K = 0, alpha = 1, beta = mean(y)
    let fit = affine_fit_heads(&mo, w_o.as_ref(), &m, &[]).unwrap();
    for j in 0..d {
        assert_eq!(fit.scale[j], 1.0);
        assert!((fit.bias[j] - mean1(&col(&y, j))).abs() < 1e-12 * n as f64);
    }
}

#[test]
fn affine_fit_heads_errors() {
    let mut mo = Moments::new(4);
    let m = HeadPairStats::from_vec(2, 3, vec![0.0; 12]).unwrap();
    let w = Mat::<f64>::zeros(3, 4);
    assert!(matches!(
        affine_fit_heads(&mo, w.as_ref(), &m, &[0]),
        Err(SlimError::EmptyAccumulator { .. })
    ));
    mo.update(Mat::<f64>::zeros(2, 4).as_ref(), Par::Seq)
        .unwrap();
    assert!(matches!(
        affine_fit_heads(&mo, w.as_ref(), &m, &[2]),
        Err(SlimError::InvalidCount { value: 2, .. })
    ));
    assert!(matches!(
        affine_fit_heads(&mo, w.as_ref(), &m, &[1, 1]),
        Err(SlimError::InvalidCount { .. })
    ));
    assert!(matches!(
        affine_fit_heads(&mo, Mat::<f64>::zeros(2, 4).as_ref(), &m, &[0]),
        Err(SlimError::ShapeMismatch {
            expected: 2,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        affine_fit_heads(&mo, Mat::<f64>::zeros(3, 5).as_ref(), &m, &[0]),
        Err(SlimError::ShapeMismatch {
            expected: 5,
            got: 4,
            ..
        })
    ));
    let m3 = HeadPairStats::from_vec(3, 3, vec![0.0; 27]).unwrap();
    assert!(matches!(
        affine_fit_heads(&mo, w.as_ref(), &m3, &[0]),
        Err(SlimError::ShapeMismatch { .. })
    ));
}

#[test]
fn affine_from_paired_matches_regression_and_guards_constant() {
    let mut r = rng(33);
    let (n, d) = (300, 5);
    let mut p = correlated(&mut r, n, d, 3.0);
    let noise = randn(&mut r, n, d);
    let mut f = Mat::from_fn(n, d, |t, j| 1.5 * p[(t, j)] - 0.5 + 0.3 * noise[(t, j)]);
    for t in 0..n {
        p[(t, 2)] = 4.25; // constant pruned coordinate
        f[(t, 2)] = 1.0 + t as f64;
    }
    let mut pm = PairedMoments::new(d);
    pm.update(p.as_ref().subrows(0, 111), f.as_ref().subrows(0, 111))
        .unwrap();
    let mut pm2 = PairedMoments::new(d);
    pm2.update(
        p.as_ref().subrows(111, n - 111),
        f.as_ref().subrows(111, n - 111),
    )
    .unwrap();
    pm.merge(&pm2).unwrap();
    let fit = affine_from_paired(&pm).unwrap();
    for j in 0..d {
        let (a, b) = fit_1d(&col(&p, j), &col(&f, j));
        assert!((fit.scale[j] - a).abs() < 1e-10 * n as f64, "alpha[{j}]");
        assert!((fit.bias[j] - b).abs() < 1e-10 * n as f64, "beta[{j}]");
    }
    assert_eq!(fit.scale[2], 1.0);
    assert!((fit.bias[2] - (mean1(&col(&f, 2)) - 4.25)).abs() < 1e-12 * n as f64);
}

/// Ridge by naive normal equations on materialised centred data.
fn naive_ridge(x: &Mat<f64>, w: &Mat<f64>, kept: &[usize], damp: f64) -> (Mat<f64>, Vec<f64>) {
    let n = x.nrows();
    let y = apply(x, w);
    let xk = select_cols(x, kept);
    let (mx, my) = (naive_mean(&xk), naive_mean(&y));
    let k = kept.len();
    let mut a = Mat::from_fn(k, k, |i, j| {
        (0..n)
            .map(|t| (xk[(t, i)] - mx[i]) * (xk[(t, j)] - mx[j]))
            .sum::<f64>()
            / n as f64
    });
    let md = (0..k).map(|i| a[(i, i)]).sum::<f64>() / k as f64;
    let lambda = if md == 0.0 { damp } else { damp * md };
    for i in 0..k {
        a[(i, i)] += lambda;
    }
    let rhs = Mat::from_fn(k, w.nrows(), |i, j| {
        (0..n)
            .map(|t| (xk[(t, i)] - mx[i]) * (y[(t, j)] - my[j]))
            .sum::<f64>()
            / n as f64
    });
    let wt = gauss_solve(&a, &rhs);
    let wp = wt.transpose().to_owned();
    let b = (0..w.nrows())
        .map(|j| my[j] - (0..k).map(|c| wp[(j, c)] * mx[c]).sum::<f64>())
        .collect();
    (wp, b)
}

#[test]
fn ridge_matches_naive_normal_equations() {
    let mut r = rng(34);
    let (n, din, dout) = (400, 10, 6);
    let x = correlated(&mut r, n, din, 2.0);
    let w = randn(&mut r, dout, din);
    let mut mo = Moments::new(din);
    mo.update(x.as_ref(), Par::Seq).unwrap();
    for (kept, damp) in [
        (vec![0usize, 3, 4, 7, 9], 0.0),
        (vec![9, 1, 2, 5], 0.1),
        (vec![6], 2.0),
    ] {
        for par in [Par::Seq, Par::rayon(2)] {
            let rec = ridge_reconstruct(&mo, w.as_ref(), &kept, damp, par).unwrap();
            let (wp, b) = naive_ridge(&x, &w, &kept, damp);
            assert_eq!(rec.weight.shape(), (dout, kept.len()));
            assert!(
                max_abs_diff(&rec.weight, &wp) < 1e-9,
                "{}",
                max_abs_diff(&rec.weight, &wp)
            );
            assert!(max_abs_diff_vec(&rec.bias, &b) < 1e-8);
        }
    }
}

#[test]
fn ridge_damp_zero_is_plain_least_squares() {
    // Independent formulation: least squares of y on [x_K, 1] (uncentred, with intercept).
    let mut r = rng(35);
    let (n, din, dout) = (300, 7, 4);
    let x = correlated(&mut r, n, din, 1.0);
    let w = randn(&mut r, dout, din);
    let kept = [1usize, 2, 6];
    let mut mo = Moments::new(din);
    mo.update(x.as_ref(), Par::Seq).unwrap();
    let rec = ridge_reconstruct(&mo, w.as_ref(), &kept, 0.0, Par::Seq).unwrap();
    let y = apply(&x, &w);
    let k = kept.len();
    let z = Mat::from_fn(n, k + 1, |t, c| if c < k { x[(t, kept[c])] } else { 1.0 });
    let ztz = Mat::from_fn(k + 1, k + 1, |i, j| {
        (0..n).map(|t| z[(t, i)] * z[(t, j)]).sum()
    });
    let zty = Mat::from_fn(k + 1, dout, |i, j| {
        (0..n).map(|t| z[(t, i)] * y[(t, j)]).sum()
    });
    let beta = gauss_solve(&ztz, &zty);
    for j in 0..dout {
        for c in 0..k {
            assert!((rec.weight[(j, c)] - beta[(c, j)]).abs() < 1e-9);
        }
        assert!((rec.bias[j] - beta[(k, j)]).abs() < 1e-9);
    }
    // when y depends only on kept columns the reconstruction is exact
    let mut w2 = w.clone();
    for j in 0..dout {
        for i in 0..din {
            if !kept.contains(&i) {
                w2[(j, i)] = 0.0;
            }
        }
    }
    let rec = ridge_reconstruct(&mo, w2.as_ref(), &kept, 0.0, Par::Seq).unwrap();
    for j in 0..dout {
        for (c, &i) in kept.iter().enumerate() {
            assert!((rec.weight[(j, c)] - w2[(j, i)]).abs() < 1e-10);
        }
        assert!(rec.bias[j].abs() < 1e-9);
    }
}

#[test]
fn ridge_constant_inputs_give_zero_weight_and_mean_bias() {
    let (n, din, dout) = (50, 5, 3);
    let x = Mat::<f64>::from_fn(n, din, |_, i| 0.1 * i as f64 + 0.25);
    let mut r = rng(36);
    let w = randn(&mut r, dout, din);
    let mut mo = Moments::new(din);
    mo.update(x.as_ref(), Par::Seq).unwrap();
    let rec = ridge_reconstruct(&mo, w.as_ref(), &[0, 2], 0.01, Par::Seq).unwrap();
    assert_eq!(max_abs(&rec.weight), 0.0);
    let y = apply(&x, &w);
    for j in 0..dout {
        assert!((rec.bias[j] - y[(0, j)]).abs() < 1e-12);
    }
    // without damping the system is singular
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[0, 2], 0.0, Par::Seq),
        Err(SlimError::NotPositiveDefinite {
            dim: 2,
            pivot: 0,
            ..
        })
    ));
}

#[test]
fn ridge_errors() {
    let mut mo = Moments::new(3);
    let w = Mat::<f64>::zeros(2, 3);
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[0], 0.1, Par::Seq),
        Err(SlimError::EmptyAccumulator { .. })
    ));
    mo.update(
        Mat::<f64>::from_fn(4, 3, |t, i| (t * t + i) as f64).as_ref(),
        Par::Seq,
    )
    .unwrap();
    assert!(matches!(
        ridge_reconstruct(&mo, Mat::<f64>::zeros(2, 4).as_ref(), &[0], 0.1, Par::Seq),
        Err(SlimError::ShapeMismatch {
            expected: 4,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[3], 0.1, Par::Seq),
        Err(SlimError::InvalidCount { value: 3, .. })
    ));
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[0, 0], 0.1, Par::Seq),
        Err(SlimError::InvalidCount { .. })
    ));
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[0], -1.0, Par::Seq),
        Err(SlimError::InvalidRatio { .. })
    ));
    assert!(matches!(
        ridge_reconstruct(&mo, w.as_ref(), &[0], f64::INFINITY, Par::Seq),
        Err(SlimError::InvalidRatio { .. })
    ));
    // columns 1 and 2 are collinear (x2 = x1 + 1): singular without damping
    let e = ridge_reconstruct(&mo, w.as_ref(), &[1, 2], 0.0, Par::Seq).unwrap_err();
    assert!(
        matches!(
            e,
            SlimError::NotPositiveDefinite {
                dim: 2,
                pivot: 1,
                ..
            }
        ),
        "{e:?}"
    );
    // empty kept set: bias is the mean output
    let rec = ridge_reconstruct(
        &mo,
        Mat::<f64>::from_fn(2, 3, |j, i| (j + i) as f64).as_ref(),
        &[],
        0.0,
        Par::Seq,
    )
    .unwrap();
    assert_eq!(rec.weight.shape(), (2, 0));
    let mu = mo.mean().unwrap();
    for j in 0..2 {
        let m: f64 = (0..3).map(|i| (j + i) as f64 * mu[i]).sum();
        assert!((rec.bias[j] - m).abs() < 1e-12);
    }
}
