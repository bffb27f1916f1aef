//! Moments, SquareSums, PairedMoments against naive per-row loops.
#![allow(clippy::needless_range_loop)] // index loops mirror the formulas
mod common;

use common::*;
use faer::{Mat, Par};
use slimllm_core::moments::{Moments, PairedMoments, SquareSums};
use slimllm_core::SlimError;

fn par2() -> Par {
    Par::rayon(2)
}

/// Naive Σx and Σ x xᵀ by per-row loops.
fn naive_raw(x: &Mat<f64>) -> (Vec<f64>, Mat<f64>) {
    let d = x.ncols();
    let mut s = vec![0.0; d];
    let mut g = Mat::zeros(d, d);
    for t in 0..x.nrows() {
        for i in 0..d {
            s[i] += x[(t, i)];
            for j in 0..d {
                g[(i, j)] += x[(t, i)] * x[(t, j)];
            }
        }
    }
    (s, g)
}

#[test]
fn update_matches_naive_loops_both_layouts_and_par() {
    let mut r = rng(1);
    let (n, d) = (300, 17);
    let x = correlated(&mut r, n, d, 3.0);
    let (s, g) = naive_raw(&x);
    let scale = max_abs(&g);
    // column-major input, chunks of uneven size, sequential
    let mut a = Moments::new(d);
    for (r0, r1) in [(0, 1), (1, 64), (64, 65), (65, 300)] {
        a.update(x.as_ref().subrows(r0, r1 - r0), Par::Seq).unwrap();
    }
    // row-major input (transpose of a column-major (d, n) matrix), parallel
    let xt = x.transpose().to_owned();
    let mut b = Moments::new(d);
    b.update(xt.as_ref().transpose(), par2()).unwrap();
    for m in [&a, &b] {
        assert_eq!(m.count(), n as u64);
        assert_eq!(m.dim(), d);
        assert!(max_abs_diff_vec(m.sum(), &s) < 1e-11 * n as f64);
        assert!(max_abs_diff(&m.gram().to_owned(), &g) < 1e-13 * n as f64 * scale);
        let gm = m.gram();
        for i in 0..d {
            for j in 0..d {
                assert_eq!(gm[(i, j)], gm[(j, i)], "gram not symmetric");
            }
        }
    }
}

#[test]
fn covariance_and_mean_match_two_pass() {
    let mut r = rng(2);
    let (n, d) = (500, 12);
    let x = correlated(&mut r, n, d, 5.0);
    let mut m = Moments::new(d);
    m.update(x.as_ref(), Par::Seq).unwrap();
    let c = m.covariance().unwrap();
    let cn = naive_cov(&x);
    assert!(max_abs_diff(&c, &cn) < 1e-12 * n as f64 * max_abs(&cn));
    assert!(max_abs_diff_vec(&m.mean().unwrap(), &naive_mean(&x)) < 1e-12 * n as f64);
    for i in 0..d {
        for j in 0..d {
            assert_eq!(c[(i, j)], c[(j, i)]);
        }
    }
}

#[test]
fn covariance_precise_with_large_offset() {
    // mean 1e6, unit-scale spread: the shifted accumulation keeps ~all digits.
    let mut r = rng(3);
    let (n, d) = (400, 6);
    let mut x = randn(&mut r, n, d);
    let base = x.clone();
    for t in 0..n {
        for j in 0..d {
            x[(t, j)] += 1e6 * (j + 1) as f64;
        }
    }
    let mut m = Moments::new(d);
    m.update(x.as_ref(), Par::Seq).unwrap();
    let c = m.covariance().unwrap();
    let cn = naive_cov(&base);
    assert!(max_abs_diff(&c, &cn) < 1e-7, "{}", max_abs_diff(&c, &cn));
}

#[test]
fn merge_of_halves_equals_one_shot() {
    let mut r = rng(4);
    let (n, d) = (257, 9);
    let x = correlated(&mut r, n, d, 2.0);
    let mut one = Moments::new(d);
    one.update(x.as_ref(), Par::Seq).unwrap();
    let mut h1 = Moments::new(d);
    let mut h2 = Moments::new(d);
    h1.update(x.as_ref().subrows(0, 100), Par::Seq).unwrap();
    h2.update(x.as_ref().subrows(100, n - 100), Par::Seq)
        .unwrap();
    // different shifts on both sides
    let mut merged = h1.clone();
    merged.merge(&h2).unwrap();
    // merge into an empty accumulator, and an empty into a full one
    let mut from_empty = Moments::new(d);
    from_empty.merge(&h1).unwrap();
    from_empty.merge(&Moments::new(d)).unwrap();
    from_empty.merge(&h2).unwrap();
    let scale = max_abs(&one.gram().to_owned());
    for m in [&merged, &from_empty] {
        assert_eq!(m.count(), n as u64);
        assert!(max_abs_diff_vec(m.sum(), one.sum()) < 1e-11 * n as f64);
        assert!(
            max_abs_diff(&m.gram().to_owned(), &one.gram().to_owned()) < 1e-13 * n as f64 * scale
        );
        assert!(
            max_abs_diff(&m.covariance().unwrap(), &one.covariance().unwrap())
                < 1e-12 * n as f64 * max_abs(&one.covariance().unwrap())
        );
        assert!(max_abs_diff_vec(&m.mean().unwrap(), &one.mean().unwrap()) < 1e-12);
    }
}

#[test]
fn f32_input_is_upcast_exactly() {
    let mut r = rng(5);
    let (n, d) = (64, 5);
    let x = randn(&mut r, n, d);
    let x32 = Mat::<f32>::from_fn(n, d, |i, j| x[(i, j)] as f32);
    let x64 = Mat::<f64>::from_fn(n, d, |i, j| x32[(i, j)] as f64);
    let mut a = Moments::new(d);
    let mut b = Moments::new(d);
    a.update(x32.as_ref(), Par::Seq).unwrap();
    b.update(x64.as_ref(), Par::Seq).unwrap();
    assert_eq!(a, b);
    let mut qa = SquareSums::new(d);
    let mut qb = SquareSums::new(d);
    qa.update(x32.as_ref(), Par::Seq).unwrap();
    qb.update(x64.as_ref(), Par::Seq).unwrap();
    assert_eq!(qa, qb);
}

#[test]
fn constant_data_has_exactly_zero_covariance() {
    let d = 4;
    let x = Mat::<f64>::from_fn(50, d, |_, j| 0.1 + j as f64 * 1.7);
    let mut m = Moments::new(d);
    m.update(x.as_ref().subrows(0, 20), Par::Seq).unwrap();
    m.update(x.as_ref().subrows(20, 30), Par::Seq).unwrap();
    let c = m.covariance().unwrap();
    assert_eq!(max_abs(&c), 0.0);
    assert_eq!(
        m.mean().unwrap(),
        (0..d).map(|j| 0.1 + j as f64 * 1.7).collect::<Vec<_>>()
    );
}

#[test]
fn non_finite_is_reported_with_first_row_and_col_and_nothing_added() {
    let (n, d) = (10, 4);
    for row_major in [false, true] {
        let mut x = Mat::<f64>::from_fn(n, d, |i, j| (i * d + j) as f64);
        x[(7, 0)] = f64::NAN;
        x[(3, 2)] = f64::INFINITY;
        x[(3, 3)] = f64::NAN;
        let xt = x.transpose().to_owned();
        let view = if row_major {
            xt.as_ref().transpose()
        } else {
            x.as_ref()
        };
        let mut m = Moments::new(d);
        let before = m.clone();
        let err = m.update(view, Par::Seq).unwrap_err();
        assert_eq!(
            err,
            SlimError::NonFinite {
                what: "x".into(),
                row: 3,
                col: 2
            }
        );
        assert_eq!(m, before);
        let mut q = SquareSums::new(d);
        assert!(matches!(
            q.update(view, Par::Seq),
            Err(SlimError::NonFinite { row: 3, col: 2, .. })
        ));
        assert_eq!(q.count(), 0);
    }
    let mut x32 = Mat::<f32>::zeros(3, 2);
    x32[(2, 1)] = f32::NEG_INFINITY;
    let mut m = Moments::new(2);
    assert!(matches!(
        m.update(x32.as_ref(), Par::Seq),
        Err(SlimError::NonFinite { row: 2, col: 1, .. })
    ));
    let mut p = PairedMoments::new(2);
    let ok = Mat::<f32>::zeros(3, 2);
    let e = p.update(ok.as_ref(), x32.as_ref()).unwrap_err();
    assert_eq!(
        e,
        SlimError::NonFinite {
            what: "full".into(),
            row: 2,
            col: 1
        }
    );
    assert_eq!(p.count(), 0);
}

#[test]
fn empty_and_shape_errors() {
    let m = Moments::new(3);
    assert!(matches!(m.mean(), Err(SlimError::EmptyAccumulator { .. })));
    assert!(matches!(
        m.covariance(),
        Err(SlimError::EmptyAccumulator { .. })
    ));
    let mut m = Moments::new(3);
    let x = Mat::<f64>::zeros(5, 4);
    assert_eq!(
        m.update(x.as_ref(), Par::Seq).unwrap_err(),
        SlimError::ShapeMismatch {
            what: "x columns".into(),
            expected: 3,
            got: 4
        }
    );
    assert!(matches!(
        m.merge(&Moments::new(4)),
        Err(SlimError::ShapeMismatch {
            expected: 3,
            got: 4,
            ..
        })
    ));
    let mut q = SquareSums::new(3);
    assert!(matches!(
        q.update(x.as_ref(), Par::Seq),
        Err(SlimError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        q.merge(&SquareSums::new(2)),
        Err(SlimError::ShapeMismatch { .. })
    ));
    let mut p = PairedMoments::new(4);
    let y = Mat::<f64>::zeros(6, 4);
    assert!(matches!(
        p.update(x.as_ref(), y.as_ref()),
        Err(SlimError::ShapeMismatch {
            expected: 5,
            got: 6,
            ..
        })
    ));
    assert!(matches!(
        p.merge(&PairedMoments::new(3)),
        Err(SlimError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        slimllm_core::recovery::affine_from_paired(&PairedMoments::new(2)),
        Err(SlimError::EmptyAccumulator { .. })
    ));
    // empty chunk is a no-op
    let mut m = Moments::new(3);
    m.update(Mat::<f64>::zeros(0, 3).as_ref(), Par::Seq)
        .unwrap();
    assert_eq!(m, Moments::new(3));
}

#[test]
fn from_parts_round_trip() {
    let mut r = rng(6);
    let x = correlated(&mut r, 80, 5, 1.0);
    let mut m = Moments::new(5);
    m.update(x.as_ref(), Par::Seq).unwrap();
    let back = Moments::from_parts(m.count(), m.sum().to_vec(), m.gram()).unwrap();
    let c = m.covariance().unwrap();
    assert!(max_abs_diff(&back.covariance().unwrap(), &c) < 1e-12 * max_abs(&c) * 80.0);
    assert!(matches!(
        Moments::from_parts(1, vec![0.0; 2], Mat::<f64>::zeros(3, 3).as_ref()),
        Err(SlimError::ShapeMismatch { .. })
    ));
}

#[test]
fn square_sums_match_naive_seq_and_rayon() {
    let mut r = rng(7);
    let (n, d) = (1000, 13);
    let x = randn(&mut r, n, d);
    let naive: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|t| x[(t, j)] * x[(t, j)]).sum())
        .collect();
    let xt = x.transpose().to_owned();
    for (view, par) in [
        (x.as_ref(), Par::Seq),
        (x.as_ref(), par2()),
        (xt.as_ref().transpose(), par2()),
        (xt.as_ref().transpose(), Par::Seq),
    ] {
        let mut q = SquareSums::new(d);
        q.update(view.subrows(0, 10), par).unwrap();
        q.update(view.subrows(10, n - 10), par).unwrap();
        assert_eq!(q.count(), n as u64);
        assert!(max_abs_diff_vec(q.sum_squares(), &naive) < 1e-12 * n as f64);
        let norms: Vec<f64> = naive.iter().map(|v| v.sqrt()).collect();
        assert!(max_abs_diff_vec(&q.norms(), &norms) < 1e-10);
    }
    let mut a = SquareSums::new(d);
    let mut b = SquareSums::new(d);
    a.update(x.as_ref().subrows(0, 400), Par::Seq).unwrap();
    b.update(x.as_ref().subrows(400, 600), Par::Seq).unwrap();
    a.merge(&b).unwrap();
    assert!(max_abs_diff_vec(a.sum_squares(), &naive) < 1e-12 * n as f64);
    assert_eq!(a.count(), n as u64);
}

#[test]
fn paired_moments_sums_and_merge() {
    let mut r = rng(8);
    let (n, d) = (200, 6);
    let p = correlated(&mut r, n, d, 4.0);
    let f = correlated(&mut r, n, d, 4.0);
    let mut one = PairedMoments::new(d);
    one.update(p.as_ref(), f.as_ref()).unwrap();
    let (sp, sf, spp, sff, spf) = one.sums();
    for j in 0..d {
        let (pj, fj) = (col(&p, j), col(&f, j));
        let tol = 1e-12 * n as f64 * 100.0;
        assert!((sp[j] - pj.iter().sum::<f64>()).abs() < tol);
        assert!((sf[j] - fj.iter().sum::<f64>()).abs() < tol);
        assert!((spp[j] - pj.iter().map(|v| v * v).sum::<f64>()).abs() < tol);
        assert!((sff[j] - fj.iter().map(|v| v * v).sum::<f64>()).abs() < tol);
        assert!((spf[j] - pj.iter().zip(&fj).map(|(a, b)| a * b).sum::<f64>()).abs() < tol);
    }
    let mut a = PairedMoments::new(d);
    let mut b = PairedMoments::new(d);
    a.update(p.as_ref().subrows(0, 70), f.as_ref().subrows(0, 70))
        .unwrap();
    b.update(
        p.as_ref().subrows(70, n - 70),
        f.as_ref().subrows(70, n - 70),
    )
    .unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a.count(), n as u64);
    let fa = slimllm_core::recovery::affine_from_paired(&a).unwrap();
    let fo = slimllm_core::recovery::affine_from_paired(&one).unwrap();
    assert!(max_abs_diff_vec(&fa.scale, &fo.scale) < 1e-10);
    assert!(max_abs_diff_vec(&fa.bias, &fo.bias) < 1e-9);
}

#[test]
fn general_strides_and_mixed_layouts() {
    // reverse_rows gives a negative row stride: neither rows nor columns are contiguous
    // slices, so the inputs go through the row-major copy.
    let mut r = rng(9);
    let (n, d) = (150, 7);
    let x = correlated(&mut r, n, d, 1.0);
    let flipped = x.as_ref().reverse_rows();
    let x_rev = Mat::from_fn(n, d, |i, j| x[(n - 1 - i, j)]);
    let mut a = Moments::new(d);
    a.update(flipped, Par::Seq).unwrap();
    let mut b = Moments::new(d);
    b.update(x_rev.as_ref(), Par::Seq).unwrap();
    assert_eq!(a.count(), b.count());
    assert!(max_abs_diff(&a.covariance().unwrap(), &b.covariance().unwrap()) < 1e-12);
    let mut q = SquareSums::new(d);
    q.update(flipped, par2()).unwrap();
    let mut q2 = SquareSums::new(d);
    q2.update(x_rev.as_ref(), Par::Seq).unwrap();
    assert!(max_abs_diff_vec(q.sum_squares(), q2.sum_squares()) < 1e-10);
    // a NaN is still located in the caller's coordinates
    let mut bad = x.clone();
    bad[(n - 1 - 5, 3)] = f64::NAN; // row 5 of the flipped view
    assert!(matches!(
        Moments::new(d).update(bad.as_ref().reverse_rows(), Par::Seq),
        Err(SlimError::NonFinite { row: 5, col: 3, .. })
    ));
    // PairedMoments with one row-major and one column-major input, and with flipped views
    let f = correlated(&mut r, n, d, 1.0);
    let ft = f.transpose().to_owned();
    let mut p1 = PairedMoments::new(d);
    p1.update(x.as_ref(), ft.as_ref().transpose()).unwrap();
    let mut p2 = PairedMoments::new(d);
    p2.update(x.as_ref(), f.as_ref()).unwrap();
    let mut p3 = PairedMoments::new(d);
    p3.update(x.as_ref().reverse_rows(), f.as_ref().reverse_rows())
        .unwrap();
    let s1 = p1.sums();
    let s2 = p2.sums();
    let s3 = p3.sums();
    for (u, (v, w)) in [s1.0, s1.1, s1.2, s1.3, s1.4].iter().zip(
        [s2.0, s2.1, s2.2, s2.3, s2.4]
            .iter()
            .zip([s3.0, s3.1, s3.2, s3.3, s3.4].iter()),
    ) {
        assert!(max_abs_diff_vec(u, v) < 1e-9);
        assert!(max_abs_diff_vec(u, w) < 1e-9);
    }
}

/// Chunks wider than one product panel (256) and longer than one transpose tile (32), neither
/// a multiple: row-major and column-major f64 and f32 input give the brute-force covariance,
/// and `covariance_into` a row-major buffer holds the same matrix.
#[test]
fn panels_and_tiles_match_naive() {
    let mut r = rng(31);
    let (n, d) = (70, 300);
    let x = correlated(&mut r, n, d, 3.0);
    let want = naive_cov(&x);
    let tol = 1e-12 * max_abs(&want);
    let xt = x.transpose().to_owned(); // its transpose is a row-major view of x
    let x32 = Mat::<f32>::from_fn(n, d, |t, j| x[(t, j)] as f32);
    let want32 = naive_cov(&Mat::from_fn(n, d, |t, j| x32[(t, j)] as f64));
    let x32t = x32.transpose().to_owned();
    for (view, want) in [(x.as_ref(), &want), (xt.as_ref().transpose(), &want)] {
        let mut m = Moments::new(d);
        m.update(view.subrows(0, 40), par2()).unwrap();
        m.update(view.subrows(40, n - 40), Par::Seq).unwrap();
        assert!(max_abs_diff(&m.covariance().unwrap(), want) <= tol);
    }
    for view in [x32.as_ref(), x32t.as_ref().transpose()] {
        let mut m = Moments::new(d);
        m.update(view, par2()).unwrap();
        let c = m.covariance().unwrap();
        assert!(max_abs_diff(&c, &want32) <= tol);
        let mut buf = vec![f64::NAN; d * d];
        m.covariance_into(faer::MatMut::from_row_major_slice_mut(&mut buf, d, d))
            .unwrap();
        let rm = Mat::from_fn(d, d, |i, j| buf[i * d + j]);
        assert_eq!(rm, c);
    }
    let mut m = Moments::new(d);
    let mut small = Mat::<f64>::zeros(d, d - 1);
    assert!(matches!(
        m.covariance_into(small.as_mut()),
        Err(SlimError::ShapeMismatch { .. })
    ));
    m.update(x.as_ref(), Par::Seq).unwrap();
    assert!(matches!(
        m.covariance_into(small.as_mut()),
        Err(SlimError::ShapeMismatch { .. })
    ));
}

/// The first non-finite value in row-major order is reported for a row-major chunk even when
/// later rows of the same transpose tile, or of later tiles, hold one in an earlier column.
#[test]
fn non_finite_first_in_row_major_order_across_tiles() {
    let (n, d) = (70, 260);
    let mut xt = Mat::<f32>::zeros(d, n); // xt.transpose() is row-major (n, d)
    xt[(200, 34)] = f32::NAN;
    xt[(9, 35)] = f32::INFINITY;
    xt[(0, 69)] = f32::NAN;
    let mut m = Moments::new(d);
    let before = m.clone();
    assert_eq!(
        m.update(xt.as_ref().transpose(), par2()).unwrap_err(),
        SlimError::NonFinite {
            what: "x".into(),
            row: 34,
            col: 200
        }
    );
    assert_eq!(m, before);
}
#[test]
fn parts_round_trip_then_merge_is_exact() {
    use slimllm_core::moments::{PairedMoments, SquareSums, PAIRED_PARTS};
    let mut r = rng(11);
    let (x, y) = (correlated(&mut r, 60, 4, 1.0), correlated(&mut r, 40, 4, 1.0));
    // Moments: rebuilt accumulators merge to the same state as the originals, bit for bit
    let (mut a, mut b) = (Moments::new(4), Moments::new(4));
    a.update(x.as_ref(), Par::Seq).unwrap();
    b.update(y.as_ref(), Par::Seq).unwrap();
    let rebuild = |m: &Moments| {
        let (n, s, c, cs, cg) = m.shifted_parts();
        Moments::from_shifted_parts(n, s.to_vec(), c.to_vec(), cs.to_vec(), cg).unwrap()
    };
    let (mut ra, rb) = (rebuild(&a), rebuild(&b));
    assert_eq!(ra, a);
    a.merge(&b).unwrap();
    ra.merge(&rb).unwrap();
    assert_eq!(ra, a);
    let (n, s, _, cs, cg) = a.shifted_parts();
    assert!(matches!(
        Moments::from_shifted_parts(n, s.to_vec(), vec![0.0; 3], cs.to_vec(), cg),
        Err(SlimError::ShapeMismatch { .. })
    ));
    // SquareSums
    let mut q = SquareSums::new(4);
    q.update(x.as_ref(), Par::Seq).unwrap();
    assert_eq!(SquareSums::from_parts(q.count(), q.sum_squares().to_vec()).unwrap(), q);
    assert!(matches!(
        SquareSums::from_parts(1, vec![f64::NAN]),
        Err(SlimError::NonFinite { .. })
    ));
    // PairedMoments
    let (mut p, mut p2) = (PairedMoments::new(4), PairedMoments::new(4));
    p.update(x.as_ref(), x.as_ref()).unwrap();
    p2.update(y.as_ref(), x.as_ref().subrows(0, 40)).unwrap();
    let rebuild_p = |m: &PairedMoments| {
        let (n, parts) = m.parts();
        PairedMoments::from_parts(n, parts.map(|v| v.to_vec())).unwrap()
    };
    let (mut rp, rp2) = (rebuild_p(&p), rebuild_p(&p2));
    p.merge(&p2).unwrap();
    rp.merge(&rp2).unwrap();
    assert_eq!(rp, p);
    let mut bad: [Vec<f64>; PAIRED_PARTS] = std::array::from_fn(|_| vec![0.0; 4]);
    bad[3] = vec![0.0; 2];
    assert!(matches!(
        PairedMoments::from_parts(1, bad),
        Err(SlimError::ShapeMismatch { .. })
    ));
}
