//! Shared helpers of the integration tests: seeded random data and naive reference formulas.
#![allow(clippy::needless_range_loop)]
#![allow(dead_code)]

use faer::Mat;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(rng: &mut StdRng, n: usize, m: usize) -> Mat<f64> {
    Mat::from_fn(n, m, |_, _| StandardNormal.sample(rng))
}

/// Correlated activations: z (n × dim) standard normal times a random mixing matrix, plus a
/// per-feature offset of size `offset`.
pub fn correlated(rng: &mut StdRng, n: usize, dim: usize, offset: f64) -> Mat<f64> {
    let z = randn(rng, n, dim);
    let mix = Mat::from_fn(dim, dim, |i, j| {
        let g: f64 = StandardNormal.sample(rng);
        if i == j {
            1.0 + g.abs()
        } else {
            0.4 * g
        }
    });
    let shift: Vec<f64> = (0..dim)
        .map(|_| offset * rng.random_range(-1.0..1.0))
        .collect();
    let mut x = Mat::zeros(n, dim);
    for t in 0..n {
        for j in 0..dim {
            let mut acc = shift[j];
            for k in 0..dim {
                acc += z[(t, k)] * mix[(k, j)];
            }
            x[(t, j)] = acc;
        }
    }
    x
}

/// Column means by explicit loops.
pub fn naive_mean(x: &Mat<f64>) -> Vec<f64> {
    let n = x.nrows() as f64;
    (0..x.ncols())
        .map(|j| (0..x.nrows()).map(|t| x[(t, j)]).sum::<f64>() / n)
        .collect()
}

/// Population covariance by the two-pass formula.
pub fn naive_cov(x: &Mat<f64>) -> Mat<f64> {
    let mu = naive_mean(x);
    let n = x.nrows() as f64;
    Mat::from_fn(x.ncols(), x.ncols(), |i, j| {
        (0..x.nrows())
            .map(|t| (x[(t, i)] - mu[i]) * (x[(t, j)] - mu[j]))
            .sum::<f64>()
            / n
    })
}

/// Population covariance of two equally long series (two-pass).
pub fn cov2(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / n
}

pub fn mean1(a: &[f64]) -> f64 {
    a.iter().sum::<f64>() / a.len() as f64
}

/// y = x wᵀ by explicit loops, (n × d_out).
pub fn apply(x: &Mat<f64>, w: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(x.nrows(), w.nrows(), |t, j| {
        (0..x.ncols()).map(|i| x[(t, i)] * w[(j, i)]).sum()
    })
}

/// Column j of a matrix as a Vec.
pub fn col(x: &Mat<f64>, j: usize) -> Vec<f64> {
    (0..x.nrows()).map(|t| x[(t, j)]).collect()
}

pub fn max_abs(x: &Mat<f64>) -> f64 {
    let mut m: f64 = 0.0;
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            m = m.max(x[(i, j)].abs());
        }
    }
    m
}

pub fn max_abs_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let mut m: f64 = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            m = m.max((a[(i, j)] - b[(i, j)]).abs());
        }
    }
    m
}

pub fn max_abs_diff_vec(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// |ρ| with the zero-variance guard of DESIGN.md section 2.
pub fn abs_rho(cov: f64, var_k: f64, var: f64) -> f64 {
    if var_k > 0.0 && var > 0.0 {
        (cov / (var_k * var).sqrt()).abs()
    } else {
        0.0
    }
}

/// Solve A x = b (square, dense) by Gaussian elimination with partial pivoting; b has
/// several columns.
pub fn gauss_solve(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let n = a.nrows();
    let mut a = a.clone();
    let mut b = b.clone();
    for k in 0..n {
        let p = (k..n)
            .max_by(|&i, &j| a[(i, k)].abs().total_cmp(&a[(j, k)].abs()))
            .unwrap();
        for c in 0..n {
            let t = a[(k, c)];
            a[(k, c)] = a[(p, c)];
            a[(p, c)] = t;
        }
        for c in 0..b.ncols() {
            let t = b[(k, c)];
            b[(k, c)] = b[(p, c)];
            b[(p, c)] = t;
        }
        for i in (k + 1)..n {
            let f = a[(i, k)] / a[(k, k)];
            for c in k..n {
                a[(i, c)] -= f * a[(k, c)];
            }
            for c in 0..b.ncols() {
                b[(i, c)] -= f * b[(k, c)];
            }
        }
    }
    let mut x = Mat::zeros(n, b.ncols());
    for c in 0..b.ncols() {
        for i in (0..n).rev() {
            let mut s = b[(i, c)];
            for k in (i + 1)..n {
                s -= a[(i, k)] * x[(k, c)];
            }
            x[(i, c)] = s / a[(i, i)];
        }
    }
    x
}
