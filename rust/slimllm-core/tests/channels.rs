//! Channel scores against the naive formula, PCA by reconstruction, channel selection.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas
mod common;

use common::*;
use faer::{Mat, Par};
use slimllm_core::channels::{channel_scores, output_pca, select_channels};
use slimllm_core::moments::Moments;
use slimllm_core::SlimError;

/// Cyclic Jacobi eigenvalue algorithm (independent of faer): returns (values, vectors as
/// columns) of a symmetric matrix.
fn jacobi_eigen(a: &Mat<f64>) -> (Vec<f64>, Mat<f64>) {
    let n = a.nrows();
    let mut a = a.clone();
    let mut v = Mat::<f64>::identity(n, n);
    for _sweep in 0..100 {
        let mut off = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    off += a[(i, j)] * a[(i, j)];
                }
            }
        }
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                if a[(p, q)].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[(q, q)] - a[(p, p)]) / (2.0 * a[(p, q)]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[(k, p)], a[(k, q)]);
                    a[(k, p)] = c * akp - s * akq;
                    a[(k, q)] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[(p, k)], a[(q, k)]);
                    a[(p, k)] = c * apk - s * aqk;
                    a[(q, k)] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[(k, p)], v[(k, q)]);
                    v[(k, p)] = c * vkp - s * vkq;
                    v[(k, q)] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[(i, i)]).collect(), v)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn pca_reconstructs_covariance() {
    let mut r = rng(21);
    let (n, d) = (300, 10);
    let y = correlated(&mut r, n, d, 1.0);
    let mut mo = Moments::new(d);
    mo.update(y.as_ref(), Par::Seq).unwrap();
    let c = mo.covariance().unwrap();
    for par in [Par::Seq, Par::rayon(2)] {
        let pca = output_pca(c.as_ref(), par).unwrap();
        let v = &pca.vectors;
        let scale = max_abs(&c);
        // V diag(λ) Vᵀ = C and VᵀV = I
        let rec = Mat::from_fn(d, d, |i, j| {
            (0..d).map(|k| v[(i, k)] * pca.values[k] * v[(j, k)]).sum()
        });
        assert!(max_abs_diff(&rec, &c) < 1e-12 * d as f64 * scale);
        let gram = Mat::from_fn(d, d, |i, j| (0..d).map(|k| v[(k, i)] * v[(k, j)]).sum());
        assert!(max_abs_diff(&gram, &Mat::identity(d, d)) < 1e-12 * d as f64);
        // nondecreasing, weights as defined
        assert!(pca.values.windows(2).all(|w| w[0] <= w[1]));
        let mean_abs = pca.values.iter().map(|l| l.abs()).sum::<f64>() / d as f64;
        for k in 0..d {
            assert!((pca.weights[k] - sigmoid(pca.values[k].abs() / mean_abs)).abs() < 1e-15);
        }
        // eigenvalues agree with the independent Jacobi solver
        let (mut jl, _) = jacobi_eigen(&c);
        jl.sort_by(f64::total_cmp);
        assert!(max_abs_diff_vec(&jl, &pca.values) < 1e-10 * scale);
    }
    assert!(matches!(
        output_pca(Mat::<f64>::zeros(2, 3).as_ref(), Par::Seq),
        Err(SlimError::ShapeMismatch { .. })
    ));
}

#[test]
fn channel_scores_match_naive_formula() {
    let mut r = rng(22);
    let (d, f, n) = (8, 20, 200);
    let y = correlated(&mut r, n, d, 0.5);
    let mut mo = Moments::new(d);
    mo.update(y.as_ref(), Par::Seq).unwrap();
    let c = mo.covariance().unwrap();
    let in_sumsq: Vec<f64> = (0..d)
        .map(|_| rand::Rng::random_range(&mut r, 0.0..50.0))
        .collect();
    let act_sumsq: Vec<f64> = (0..f)
        .map(|_| rand::Rng::random_range(&mut r, 0.0..50.0))
        .collect();
    let w_gate = randn(&mut r, f, d);
    let w_up = randn(&mut r, f, d);
    let w_down = randn(&mut r, d, f);

    // naive, with eigenvectors from Jacobi
    let (lam, v) = jacobi_eigen(&c);
    let mean_abs = lam.iter().map(|l| l.abs()).sum::<f64>() / d as f64;
    let w: Vec<f64> = lam.iter().map(|l| sigmoid(l.abs() / mean_abs)).collect();
    let l_in: Vec<f64> = in_sumsq.iter().map(|s| s.sqrt()).collect();
    let mut gate = vec![0.0; f];
    let mut up = vec![0.0; f];
    let mut down = vec![0.0; f];
    for ch in 0..f {
        let mut g2 = 0.0;
        let mut u2 = 0.0;
        for i in 0..d {
            g2 += (w_gate[(ch, i)] * l_in[i]).powi(2);
            u2 += (w_up[(ch, i)] * l_in[i]).powi(2);
        }
        gate[ch] = g2.sqrt();
        up[ch] = u2.sqrt();
        let mut s2 = 0.0;
        for k in 0..d {
            let mut p = 0.0;
            for i in 0..d {
                p += w_down[(i, ch)] * v[(i, k)];
            }
            s2 += (p.abs() * w[k]).powi(2);
        }
        down[ch] = act_sumsq[ch].sqrt() * s2.sqrt();
    }
    for par in [Par::Seq, Par::rayon(2)] {
        let s = channel_scores(
            &in_sumsq,
            &act_sumsq,
            c.as_ref(),
            w_gate.as_ref(),
            w_up.as_ref(),
            w_down.as_ref(),
            par,
        )
        .unwrap();
        assert!(max_abs_diff_vec(&s.gate, &gate) < 1e-12 * 50.0);
        assert!(max_abs_diff_vec(&s.up, &up) < 1e-12 * 50.0);
        assert!(
            max_abs_diff_vec(&s.down, &down) < 1e-9,
            "{}",
            max_abs_diff_vec(&s.down, &down)
        );
        let tot = s.total();
        for ch in 0..f {
            assert_eq!(tot[ch], s.gate[ch] + s.up[ch] + s.down[ch]);
        }
    }
}

#[test]
fn zero_covariance_gives_half_weights() {
    let d = 3;
    let pca = output_pca(Mat::<f64>::zeros(d, d).as_ref(), Par::Seq).unwrap();
    assert_eq!(pca.weights, vec![0.5; d]);
    // I_down = l_a * 0.5 * ‖W_down[:, c]‖ (V orthonormal)
    let w_down = Mat::from_fn(d, 2, |i, c| (i + c) as f64);
    let s = channel_scores(
        &[1.0; 3],
        &[4.0, 9.0],
        Mat::<f64>::zeros(d, d).as_ref(),
        Mat::<f64>::zeros(2, d).as_ref(),
        Mat::<f64>::zeros(2, d).as_ref(),
        w_down.as_ref(),
        Par::Seq,
    )
    .unwrap();
    for c in 0..2 {
        let norm = (0..d).map(|i| w_down[(i, c)].powi(2)).sum::<f64>().sqrt();
        let l_a = [2.0, 3.0][c];
        assert!((s.down[c] - l_a * 0.5 * norm).abs() < 1e-12);
    }
}

#[test]
fn channel_score_errors() {
    let z = |r, c| Mat::<f64>::zeros(r, c);
    let (d, f) = (3, 4);
    let ok = channel_scores(
        &[1.0; 3],
        &[1.0; 4],
        z(d, d).as_ref(),
        z(f, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    );
    assert!(ok.is_ok());
    let e = channel_scores(
        &[1.0; 3],
        &[1.0; 4],
        z(d, d).as_ref(),
        z(f, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f + 1).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        e,
        SlimError::ShapeMismatch {
            what: "w_down columns".into(),
            expected: f,
            got: f + 1
        }
    );
    let e = channel_scores(
        &[1.0; 3],
        &[1.0; 4],
        z(d, d).as_ref(),
        z(f - 1, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        e,
        SlimError::ShapeMismatch {
            what: "w_gate rows".into(),
            expected: f,
            got: f - 1
        }
    );
    let e = channel_scores(
        &[1.0; 3],
        &[1.0; 4],
        z(d, 2).as_ref(),
        z(f, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(matches!(e, SlimError::ShapeMismatch { .. }));
    let mut bad = z(f, d);
    bad[(2, 1)] = f64::NAN;
    let e = channel_scores(
        &[1.0; 3],
        &[1.0; 4],
        z(d, d).as_ref(),
        z(f, d).as_ref(),
        bad.as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        e,
        SlimError::NonFinite {
            what: "w_up".into(),
            row: 2,
            col: 1
        }
    );
    let e = channel_scores(
        &[1.0, f64::NAN, 1.0],
        &[1.0; 4],
        z(d, d).as_ref(),
        z(f, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert_eq!(
        e,
        SlimError::NonFinite {
            what: "in_sumsq".into(),
            row: 1,
            col: 0
        }
    );
    let e = channel_scores(
        &[1.0; 3],
        &[1.0, -1.0, 0.0, 0.0],
        z(d, d).as_ref(),
        z(f, d).as_ref(),
        z(f, d).as_ref(),
        z(d, f).as_ref(),
        Par::Seq,
    )
    .unwrap_err();
    assert!(matches!(e, SlimError::InvalidRatio { .. }));
}

#[test]
fn select_channels_order_ties_and_protect() {
    let s = [3.0, 1.0, 2.0, 1.0, 0.5, 2.0];
    // ascending with ties by index: 4(0.5) 1(1) 3(1) 2(2) 5(2) 0(3)
    assert_eq!(select_channels(&s, 3, 0.0).unwrap(), vec![1, 3, 4]);
    assert_eq!(select_channels(&s, 4, 0.0).unwrap(), vec![1, 2, 3, 4]);
    assert_eq!(select_channels(&s, 0, 0.0).unwrap(), Vec::<usize>::new());
    // protect round(0.25 * 6) = round(1.5) = 2 -> skip 4, 1; prune 3, 2
    assert_eq!(select_channels(&s, 2, 0.25).unwrap(), vec![2, 3]);
    // protect round(0.75 * 6) = round(4.5) = 4 (half to even), clamped to F - n_prune = 3
    assert_eq!(select_channels(&s, 3, 0.75).unwrap(), vec![0, 2, 5]);
    // -0.0 and 0.0 tie: lower index first
    assert_eq!(select_channels(&[0.0, -0.0, 1.0], 1, 0.0).unwrap(), vec![0]);
}

#[test]
fn select_channels_paper_one_percent_quirk() {
    // F = 250: 1% = 2.5 -> 2 protected; F = 350: 3.5 -> 4 protected.
    for (f, protected) in [(250usize, 2usize), (350, 4), (100, 1), (11008, 110)] {
        let scores: Vec<f64> = (0..f).map(|c| ((c * 7919) % f) as f64).collect();
        let mut order: Vec<usize> = (0..f).collect();
        order.sort_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap());
        let n_prune = f / 5;
        let got = select_channels(&scores, n_prune, 0.01).unwrap();
        let mut want = order[protected..protected + n_prune].to_vec();
        want.sort();
        assert_eq!(got, want, "F = {f}");
    }
}

#[test]
fn select_channels_errors() {
    let s = [1.0, 2.0, 3.0];
    assert!(matches!(
        select_channels(&s, 3, 0.0),
        Err(SlimError::InvalidCount {
            value: 3,
            max: 2,
            ..
        })
    ));
    assert!(matches!(
        select_channels(&[], 0, 0.0),
        Err(SlimError::InvalidCount { .. })
    ));
    assert!(matches!(
        select_channels(&s, 1, 1.0),
        Err(SlimError::InvalidRatio { .. })
    ));
    assert!(matches!(
        select_channels(&s, 1, -0.1),
        Err(SlimError::InvalidRatio { .. })
    ));
    assert!(matches!(
        select_channels(&s, 1, f64::NAN),
        Err(SlimError::InvalidRatio { .. })
    ));
    assert_eq!(
        select_channels(&[1.0, f64::NAN, 0.0], 1, 0.0).unwrap_err(),
        SlimError::NonFinite {
            what: "scores".into(),
            row: 1,
            col: 0
        }
    );
}
