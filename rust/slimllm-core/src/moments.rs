//! Streaming activation statistics in f64 (DESIGN.md section 2, first paragraph; section 4).
//!
//! Inputs are chunks of shape (tokens, features), f32 or f64, in any memory layout (a numpy
//! C-order array arrives row-major); every sum is kept in f64 whatever the input type.
//!
//! Precision: [`Moments`] and [`PairedMoments`] accumulate internally about a *shift* c (the
//! first row they see), i.e. Σ (x − c) and Σ (x − c)(x − c)ᵀ, and centre from those. This
//! costs nothing and makes the centred statistics of a constant feature exactly zero (raw
//! S − s sᵀ/n leaves rounding noise there), which is what the zero-variance guards of
//! [`crate::heads`] and [`crate::recovery`] rely on. The raw sums returned by the accessors
//! ([`Moments::sum`], [`Moments::gram`], [`PairedMoments::sums`]) are the documented Σ x and
//! Σ x xᵀ.

use std::sync::OnceLock;

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Result, SlimError};

/// Scalar types an accumulator accepts (f32 and f64), upcast to f64 on the way in.
///
/// Sealed: only `f32` and `f64` implement it.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
    /// Exact conversion to f64.
    fn to_f64(self) -> f64;
}
impl Element for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Element for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

// ---------------------------------------------------------------------------------------------
// shared private helpers
// ---------------------------------------------------------------------------------------------

/// A matrix seen as contiguous lines: its rows (row-major storage, or a row-major copy for
/// other strides) or its columns (column-major storage).
pub(crate) enum Lines<'a, T> {
    /// `lines[r]` is row r (length ncols).
    Rows(Vec<&'a [T]>),
    /// `lines[c]` is column c (length nrows).
    Cols(Vec<&'a [T]>),
}

/// Contiguous lines of `x` without copying when its storage allows; otherwise a row-major
/// copy is made in `buf`.
pub(crate) fn lines<'a, T: Element>(x: MatRef<'a, T>, buf: &'a mut Vec<T>) -> Lines<'a, T> {
    let (n, m) = x.shape();
    if x.col_stride() == 1 || m == 0 {
        Lines::Rows(
            (0..n)
                .map(|r| match x.row(r).try_as_row_major() {
                    Some(row) => row.as_slice(),
                    None => &[][..],
                })
                .collect(),
        )
    } else if x.row_stride() == 1 || n == 0 {
        Lines::Cols(
            (0..m)
                .map(|c| x.col(c).try_as_col_major().unwrap().as_slice())
                .collect(),
        )
    } else {
        buf.clear();
        buf.reserve(n * m);
        for r in 0..n {
            for c in 0..m {
                buf.push(x[(r, c)]);
            }
        }
        Lines::Rows(buf.chunks(m).collect())
    }
}

/// Lexicographically first (row, col) of a non-finite value of `x`, scanning in the order that
/// suits its memory layout.
pub(crate) fn first_non_finite<T: Element>(x: MatRef<'_, T>) -> Option<(usize, usize)> {
    let mut buf = Vec::new();
    match lines(x, &mut buf) {
        Lines::Rows(rows) => {
            for (r, row) in rows.iter().enumerate() {
                if let Some(c) = row.iter().position(|v| !v.to_f64().is_finite()) {
                    return Some((r, c));
                }
            }
            None
        }
        Lines::Cols(cols) => {
            let mut best: Option<(usize, usize)> = None;
            for (c, col) in cols.iter().enumerate() {
                let limit = best.map_or(col.len(), |(r, _)| r);
                if let Some(r) = col[..limit].iter().position(|v| !v.to_f64().is_finite()) {
                    best = Some((r, c));
                }
            }
            best
        }
    }
}

/// `Err(NonFinite)` naming `what` if `x` holds a NaN or infinity.
pub(crate) fn check_finite<T: Element>(x: MatRef<'_, T>, what: &str) -> Result<()> {
    match first_non_finite(x) {
        None => Ok(()),
        Some((row, col)) => Err(SlimError::NonFinite {
            what: what.to_string(),
            row,
            col,
        }),
    }
}

/// `Err(NonFinite)` naming `what` (row = index, col = 0) if the slice holds a NaN or infinity.
pub(crate) fn check_finite_slice(x: &[f64], what: &str) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(row) => Err(SlimError::NonFinite {
            what: what.to_string(),
            row,
            col: 0,
        }),
    }
}

pub(crate) fn shape_mismatch(what: impl Into<String>, expected: usize, got: usize) -> SlimError {
    SlimError::ShapeMismatch {
        what: what.into(),
        expected,
        got,
    }
}

fn check_cols<T>(x: MatRef<'_, T>, dim: usize, what: &str) -> Result<()> {
    if x.ncols() != dim {
        return Err(shape_mismatch(format!("{what} columns"), dim, x.ncols()));
    }
    Ok(())
}

/// Mirror the strict lower triangle of a square matrix into its upper triangle.
pub(crate) fn mirror_lower(mut a: MatMut<'_, f64>) {
    // Tiled, so that the transposed writes stay in cache.
    const T: usize = 64;
    let n = a.nrows();
    for jb in (0..n).step_by(T) {
        for ib in (jb..n).step_by(T) {
            for j in jb..(jb + T).min(n) {
                for i in ib.max(j + 1)..(ib + T).min(n) {
                    let v = a[(i, j)];
                    a[(j, i)] = v;
                }
            }
        }
    }
}

/// Number of rows as f64.
#[inline]
fn as_f64(n: u64) -> f64 {
    n as f64
}

// ---------------------------------------------------------------------------------------------
// Moments
// ---------------------------------------------------------------------------------------------

/// First and second moments of a stream of feature vectors x (dimension `dim`):
/// count n, sum s = Σ x (dim), Gram S = Σ x xᵀ (dim × dim), all f64 (DESIGN.md section 2).
///
/// Statistics derived from them: mean μ = s / n and the centred (population) covariance
/// C = (S − s sᵀ / n) / n. Accumulators over disjoint parts of a stream can be
/// [merged](Moments::merge).
///
/// Memory: one `dim × dim` f64 matrix (128 MiB for dim = 4096), plus a second one, built on
/// first use, if [`Moments::gram`] is called.
///
/// ```rust
/// use faer::{mat, Par};
/// use slimllm_core::moments::Moments;
///
/// let mut m = Moments::new(2);
/// m.update(mat![[1.0f32, 2.0], [3.0, 6.0]].as_ref(), Par::Seq)?;
/// assert_eq!(m.count(), 2);
/// assert_eq!(m.mean()?, vec![2.0, 4.0]);
/// let c = m.covariance()?; // population covariance
/// assert_eq!((c[(0, 0)], c[(0, 1)], c[(1, 1)]), (1.0, 2.0, 4.0));
/// # Ok::<(), slimllm_core::SlimError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Moments {
    dim: usize,
    count: u64,
    /// Raw Σ x.
    sum: Vec<f64>,
    /// Shift c (the first row seen; zeros before that or after `from_parts`).
    shift: Vec<f64>,
    /// Σ (x − c).
    csum: Vec<f64>,
    /// Σ (x − c)(x − c)ᵀ, lower triangle only (upper triangle stays zero).
    cgram: Mat<f64>,
    /// Raw Gram S, both triangles, built on demand by `gram()`.
    gram_cache: OnceLock<Mat<f64>>,
}

impl PartialEq for Moments {
    fn eq(&self, other: &Self) -> bool {
        self.dim == other.dim
            && self.count == other.count
            && self.sum == other.sum
            && self.shift == other.shift
            && self.csum == other.csum
            && self.cgram == other.cgram
    }
}

impl Moments {
    /// An empty accumulator for `dim` features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            sum: vec![0.0; dim],
            shift: vec![0.0; dim],
            csum: vec![0.0; dim],
            cgram: Mat::zeros(dim, dim),
            gram_cache: OnceLock::new(),
        }
    }

    /// Rebuild an accumulator from its raw parts: `count` rows with sum `sum` (length dim)
    /// and Gram matrix `gram` (dim × dim, symmetric; its lower triangle is used), e.g. when
    /// deserialising. Errors: `ShapeMismatch`, `NonFinite`.
    pub fn from_parts(count: u64, sum: Vec<f64>, gram: MatRef<'_, f64>) -> Result<Self> {
        let dim = sum.len();
        if gram.nrows() != dim {
            return Err(shape_mismatch("gram rows", dim, gram.nrows()));
        }
        check_cols(gram, dim, "gram")?;
        check_finite_slice(&sum, "sum")?;
        check_finite(gram, "gram")?;
        let mut cgram = Mat::zeros(dim, dim);
        for j in 0..dim {
            for i in j..dim {
                cgram[(i, j)] = gram[(i, j)];
            }
        }
        Ok(Self {
            dim,
            count,
            csum: sum.clone(),
            sum,
            shift: vec![0.0; dim],
            cgram,
            gram_cache: OnceLock::new(),
        })
    }

    /// The exact internal state `(count, sum, shift, shifted_sum, shifted_gram)`: Σ x, the
    /// shift c, Σ (x − c) and Σ (x − c)(x − c)ᵀ (`dim × dim`, lower triangle; the upper one is
    /// zero). With [`Moments::from_shifted_parts`] it moves an accumulator between processes
    /// without the cancellation of the raw Gram (DESIGN.md section 2); merging the rebuilt
    /// accumulators equals merging the originals bit for bit.
    pub fn shifted_parts(&self) -> (u64, &[f64], &[f64], &[f64], MatRef<'_, f64>) {
        (self.count, &self.sum, &self.shift, &self.csum, self.cgram.as_ref())
    }

    /// Rebuild an accumulator from [`Moments::shifted_parts`]: `count` rows, raw sum `sum`,
    /// shift `shift`, shifted sum `shifted_sum` (each of length dim = `sum.len()`) and shifted
    /// Gram `shifted_gram` (dim × dim; its lower triangle is used).
    /// Errors: `ShapeMismatch` (a length or the Gram's shape differs from dim), `NonFinite`.
    pub fn from_shifted_parts(
        count: u64,
        sum: Vec<f64>,
        shift: Vec<f64>,
        shifted_sum: Vec<f64>,
        shifted_gram: MatRef<'_, f64>,
    ) -> Result<Self> {
        let dim = sum.len();
        if shift.len() != dim {
            return Err(shape_mismatch("shift length", dim, shift.len()));
        }
        if shifted_sum.len() != dim {
            return Err(shape_mismatch("shifted_sum length", dim, shifted_sum.len()));
        }
        if shifted_gram.nrows() != dim {
            return Err(shape_mismatch("shifted_gram rows", dim, shifted_gram.nrows()));
        }
        check_cols(shifted_gram, dim, "shifted_gram")?;
        check_finite_slice(&sum, "sum")?;
        check_finite_slice(&shift, "shift")?;
        check_finite_slice(&shifted_sum, "shifted_sum")?;
        check_finite(shifted_gram, "shifted_gram")?;
        let cgram = Mat::from_fn(dim, dim, |i, j| if i >= j { shifted_gram[(i, j)] } else { 0.0 });
        Ok(Self {
            dim,
            count,
            sum,
            shift,
            csum: shifted_sum,
            cgram,
            gram_cache: OnceLock::new(),
        })
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of rows (tokens) seen.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// s = Σ x, length `dim`.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }
    /// S = Σ x xᵀ, `dim × dim` (symmetric, both triangles filled).
    ///
    /// Built from the internal shifted sums on the first call after an update (O(dim²)) and
    /// cached until the next [`update`](Moments::update) / [`merge`](Moments::merge).
    pub fn gram(&self) -> MatRef<'_, f64> {
        self.gram_cache
            .get_or_init(|| {
                let n = as_f64(self.count);
                let (c, cs) = (&self.shift, &self.csum);
                let mut g = Mat::zeros(self.dim, self.dim);
                for j in 0..self.dim {
                    for i in j..self.dim {
                        g[(i, j)] =
                            self.cgram[(i, j)] + c[i] * cs[j] + cs[i] * c[j] + n * c[i] * c[j];
                    }
                }
                mirror_lower(g.as_mut());
                g
            })
            .as_ref()
    }

    /// Add a chunk `x` of shape (tokens, dim): n += tokens, s += Σ rows,
    /// S += xᵀx (lower triangle only, by 256-column panels of faer products on the upcast,
    /// shifted chunk copied once to (tokens, dim) column-major; `par` passed to faer).
    /// Scratch memory: tokens × dim f64.
    ///
    /// Errors: `ShapeMismatch` if `x.ncols() != dim`, `NonFinite` (row, col of the first bad
    /// value in row-major order) before anything is added. An empty chunk is a no-op.
    pub fn update<T: Element>(&mut self, x: MatRef<'_, T>, par: Par) -> Result<()> {
        check_cols(x, self.dim, "x")?;
        let (n, dim) = x.shape();
        if n == 0 {
            return Ok(());
        }
        let mut buf = Vec::new();
        let lines = lines(x, &mut buf);
        let shift: Vec<f64> = if self.count == 0 {
            (0..dim).map(|c| x[(0, c)].to_f64()).collect()
        } else {
            self.shift.clone()
        };
        // One pass: finiteness check, upcast, shift, raw and shifted column sums, into
        // temporaries only. The shifted copy is (tokens, dim) column-major whatever the input
        // layout (the layout faer's product is fastest with: Xᵀ row-major times X).
        let mut s = vec![0.0; dim];
        let mut cs = vec![0.0; dim];
        let xc = match &lines {
            Lines::Rows(rows) => {
                // Tiled transpose: TILE rows at a time, written column by column.
                const TILE: usize = 32;
                let mut xc = Mat::<f64>::zeros(n, dim);
                for t0 in (0..n).step_by(TILE) {
                    let block = &rows[t0..(t0 + TILE).min(n)];
                    let mut bad: Option<(usize, usize)> = None;
                    for c in 0..dim {
                        let dst = xc.col_mut(c).try_as_col_major_mut().unwrap();
                        let dst = &mut dst.as_slice_mut()[t0..t0 + block.len()];
                        let (mut sc, mut csc) = (0.0, 0.0);
                        for (k, (d, row)) in dst.iter_mut().zip(block).enumerate() {
                            let v = row[c].to_f64();
                            if !v.is_finite() && bad.is_none_or(|(br, _)| k < br) {
                                bad = Some((k, c));
                            }
                            let y = v - shift[c];
                            sc += v;
                            csc += y;
                            *d = y;
                        }
                        s[c] += sc;
                        cs[c] += csc;
                    }
                    if let Some((k, col)) = bad {
                        return Err(SlimError::NonFinite {
                            what: "x".into(),
                            row: t0 + k,
                            col,
                        });
                    }
                }
                xc
            }
            Lines::Cols(cols) => {
                let mut xc = Mat::<f64>::zeros(n, dim);
                let mut bad: Option<(usize, usize)> = None;
                for (c, col) in cols.iter().enumerate() {
                    let dst = xc.col_mut(c).try_as_col_major_mut().unwrap();
                    let dst = dst.as_slice_mut();
                    let (mut sc, mut csc) = (0.0, 0.0);
                    for (r, (d, v)) in dst.iter_mut().zip(col.iter()).enumerate() {
                        let v = v.to_f64();
                        if !v.is_finite() && bad.is_none_or(|(br, _)| r < br) {
                            bad = Some((r, c));
                        }
                        let y = v - shift[c];
                        sc += v;
                        csc += y;
                        *d = y;
                    }
                    s[c] = sc;
                    cs[c] = csc;
                }
                if let Some((row, col)) = bad {
                    return Err(SlimError::NonFinite {
                        what: "x".into(),
                        row,
                        col,
                    });
                }
                xc
            }
        };
        drop(lines);
        self.shift = shift;
        self.add_shifted_chunk(xc.as_ref(), &s, &cs, par);
        Ok(())
    }

    /// The non-generic part of [`Moments::update`] (kept out of the generic function so that
    /// faer's product is compiled once, in this crate): add a checked, shifted chunk `xc_tok`
    /// (tokens, dim) and its raw and shifted column sums.
    #[inline(never)]
    fn add_shifted_chunk(&mut self, xc_tok: MatRef<'_, f64>, s: &[f64], cs: &[f64], par: Par) {
        self.sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        self.csum.iter_mut().zip(cs).for_each(|(a, b)| *a += b);
        // Lower triangle of Σ (x-c)(x-c)^T (a symmetric rank-k update), by column panels of
        // width PANEL: the diagonal block by a triangular product, everything below it by
        // one rectangular product (faer's general kernel, much faster than its recursive
        // triangular one). No entry above the diagonal is written.
        const PANEL: usize = 256;
        let dim = self.dim;
        let xt = xc_tok.transpose(); // (dim, tokens)
        let mut j0 = 0;
        while j0 < dim {
            let w = PANEL.min(dim - j0);
            let panel = xc_tok.subcols(j0, w); // (tokens, w)
            triangular::matmul(
                self.cgram.as_mut().submatrix_mut(j0, j0, w, w),
                BlockStructure::TriangularLower,
                Accum::Add,
                xt.subrows(j0, w),
                BlockStructure::Rectangular,
                panel,
                BlockStructure::Rectangular,
                1.0,
                par,
            );
            let below = dim - j0 - w;
            if below > 0 {
                matmul(
                    self.cgram.as_mut().submatrix_mut(j0 + w, j0, below, w),
                    Accum::Add,
                    xt.subrows(j0 + w, below),
                    panel,
                    1.0,
                    par,
                );
            }
            j0 += w;
        }
        self.count += xc_tok.nrows() as u64;
        self.gram_cache = OnceLock::new();
    }

    /// Add another accumulator's rows (same result as having seen both streams, up to
    /// rounding). Errors: `ShapeMismatch` on different `dim`.
    pub fn merge(&mut self, other: &Moments) -> Result<()> {
        if other.dim != self.dim {
            return Err(shape_mismatch("merged moments dim", self.dim, other.dim));
        }
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        let no = as_f64(other.count);
        // Re-express other's shifted sums about self's shift: x - c_s = (x - c_o) + delta.
        let delta: Vec<f64> = (0..self.dim)
            .map(|i| other.shift[i] - self.shift[i])
            .collect();
        let os = &other.csum;
        for j in 0..self.dim {
            for i in j..self.dim {
                self.cgram[(i, j)] += other.cgram[(i, j)]
                    + os[i] * delta[j]
                    + delta[i] * os[j]
                    + no * delta[i] * delta[j];
            }
        }
        for i in 0..self.dim {
            self.csum[i] += os[i] + no * delta[i];
            self.sum[i] += other.sum[i];
        }
        self.count += other.count;
        self.gram_cache = OnceLock::new();
        Ok(())
    }

    /// Mean μ = s / n (computed as c + Σ(x − c)/n, exact for constant features).
    /// Errors: `EmptyAccumulator`.
    pub fn mean(&self) -> Result<Vec<f64>> {
        let n = self.nonempty("moments (mean)")?;
        Ok((0..self.dim)
            .map(|i| self.shift[i] + self.csum[i] / n)
            .collect())
    }

    /// Centred (population) covariance C = (S − s sᵀ / n) / n, `dim × dim`, symmetric.
    /// Computed from the shifted sums, so a constant feature has exactly zero row/column.
    /// Errors: `EmptyAccumulator`.
    pub fn covariance(&self) -> Result<Mat<f64>> {
        let mut c = Mat::zeros(self.dim, self.dim);
        self.covariance_into(c.as_mut())?;
        Ok(c)
    }

    /// [`Moments::covariance`] written into `out` (dim × dim, any strides; e.g. a row-major
    /// buffer the caller hands on without a copy). Every entry of `out` is overwritten.
    /// One sequential pass over the lower triangle plus a tiled mirror: O(dim²), no
    /// allocation. Errors: `ShapeMismatch` (out not dim × dim), `EmptyAccumulator`.
    pub fn covariance_into(&self, out: MatMut<'_, f64>) -> Result<()> {
        if out.nrows() != self.dim {
            return Err(shape_mismatch(
                "covariance output rows",
                self.dim,
                out.nrows(),
            ));
        }
        check_cols(out.as_ref(), self.dim, "covariance output")?;
        let n = self.nonempty("moments (covariance)")?;
        // C is symmetric: fill the lower triangle of whichever of out / outᵀ is column-major,
        // so that reads (columns of cgram) and writes are both contiguous.
        let mut c = if out.row_stride() != 1 && out.col_stride() == 1 {
            out.transpose_mut()
        } else {
            out
        };
        let cs = &self.csum;
        for j in 0..self.dim {
            let mj = cs[j] / n;
            let src = &self.cgram.col(j).try_as_col_major().unwrap().as_slice()[j..];
            let mut dst = c.as_mut().col_mut(j).subrows_mut(j, self.dim - j);
            for (k, (g, csi)) in src.iter().zip(&cs[j..]).enumerate() {
                dst[k] = (g - csi * mj) / n;
            }
        }
        mirror_lower(c);
        Ok(())
    }

    /// Rows `rows` of the covariance: C[rows, :] (|rows| × dim), without building all of C.
    /// Indices must be `< dim` (checked by the callers).
    pub(crate) fn covariance_rows(&self, rows: &[usize]) -> Result<Mat<f64>> {
        let n = self.nonempty("moments (covariance)")?;
        let cs = &self.csum;
        let g = |i: usize, j: usize| {
            if i >= j {
                self.cgram[(i, j)]
            } else {
                self.cgram[(j, i)]
            }
        };
        Ok(Mat::from_fn(rows.len(), self.dim, |r, j| {
            let i = rows[r];
            (g(i, j) - cs[i] * (cs[j] / n)) / n
        }))
    }

    fn nonempty(&self, what: &str) -> Result<f64> {
        if self.count == 0 {
            return Err(SlimError::EmptyAccumulator {
                what: what.to_string(),
            });
        }
        Ok(as_f64(self.count))
    }
}

// ---------------------------------------------------------------------------------------------
// SquareSums
// ---------------------------------------------------------------------------------------------

/// The cheap variant: count and per-feature sum of squares Σ x_i² only (DESIGN.md section 3,
/// the activation norms l = sqrt(Σ x²) of the channel score).
#[derive(Debug, Clone, PartialEq)]
pub struct SquareSums {
    dim: usize,
    count: u64,
    sumsq: Vec<f64>,
}

impl SquareSums {
    /// An empty accumulator for `dim` features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            sumsq: vec![0.0; dim],
        }
    }
    /// Rebuild an accumulator from its parts (`count`, [`SquareSums::sum_squares`]), e.g. sums
    /// added up over processes; dim = `sum_squares.len()`. Errors: `NonFinite`.
    pub fn from_parts(count: u64, sum_squares: Vec<f64>) -> Result<Self> {
        check_finite_slice(&sum_squares, "sum_squares")?;
        Ok(Self {
            dim: sum_squares.len(),
            count,
            sumsq: sum_squares,
        })
    }
    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of rows (tokens) seen.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Σ x_i² per feature, length `dim`.
    pub fn sum_squares(&self) -> &[f64] {
        &self.sumsq
    }
    /// Add a chunk `x` of shape (tokens, dim). With `Par::Rayon` the rows are split between
    /// threads. Same errors as [`Moments::update`], raised before anything is added.
    pub fn update<T: Element>(&mut self, x: MatRef<'_, T>, par: Par) -> Result<()> {
        check_cols(x, self.dim, "x")?;
        check_finite(x, "x")?;
        let (n, dim) = x.shape();
        let mut buf = Vec::new();
        let lines = lines(x, &mut buf);
        let partial = |r0: usize, r1: usize| -> Vec<f64> {
            let mut acc = vec![0.0; dim];
            match &lines {
                Lines::Cols(cols) => {
                    for (a, col) in acc.iter_mut().zip(cols) {
                        *a = col[r0..r1].iter().map(|v| v.to_f64() * v.to_f64()).sum();
                    }
                }
                Lines::Rows(rows) => {
                    for row in &rows[r0..r1] {
                        for (a, v) in acc.iter_mut().zip(row.iter()) {
                            let v = v.to_f64();
                            *a += v * v;
                        }
                    }
                }
            }
            acc
        };
        let add = match par {
            Par::Rayon(t) if n >= 2 * 64 => {
                let chunks = t.get().min(n / 64).max(1);
                let step = n.div_ceil(chunks);
                (0..chunks)
                    .into_par_iter()
                    .map(|k| partial((k * step).min(n), ((k + 1) * step).min(n)))
                    .reduce(
                        || vec![0.0; dim],
                        |mut a, b| {
                            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                            a
                        },
                    )
            }
            _ => partial(0, n),
        };
        self.sumsq.iter_mut().zip(&add).for_each(|(s, a)| *s += a);
        self.count += n as u64;
        Ok(())
    }
    /// Add another accumulator's rows. Errors: `ShapeMismatch` on different `dim`.
    pub fn merge(&mut self, other: &SquareSums) -> Result<()> {
        if other.dim != self.dim {
            return Err(shape_mismatch(
                "merged square sums dim",
                self.dim,
                other.dim,
            ));
        }
        self.sumsq
            .iter_mut()
            .zip(&other.sumsq)
            .for_each(|(s, o)| *s += o);
        self.count += other.count;
        Ok(())
    }
    /// l_i = sqrt(Σ x_i²) per feature (the paper's activation norm).
    pub fn norms(&self) -> Vec<f64> {
        self.sumsq.iter().map(|v| v.sqrt()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// PairedMoments
// ---------------------------------------------------------------------------------------------

/// Number of per-coordinate vectors in [`PairedMoments::parts`].
pub const PAIRED_PARTS: usize = 11;

/// Per-coordinate cross statistics of two streams of equal width, a pruned output p and the
/// full output f (DESIGN.md section 3, "Recovery"): n, Σp, Σf, Σp², Σf², Σp·f per coordinate.
/// Feeds [`crate::recovery::affine_from_paired`].
#[derive(Debug, Clone, PartialEq)]
pub struct PairedMoments {
    dim: usize,
    count: u64,
    // raw sums
    sp: Vec<f64>,
    sf: Vec<f64>,
    spp: Vec<f64>,
    sff: Vec<f64>,
    spf: Vec<f64>,
    // shifts (first row) and sums of shifted values
    cp: Vec<f64>,
    cf: Vec<f64>,
    dp: Vec<f64>,
    df: Vec<f64>,
    dpp: Vec<f64>,
    dpf: Vec<f64>,
}

/// Centred per-coordinate statistics: (mean p, mean f, var p, cov(p, f)), population.
pub(crate) struct PairedCentred {
    pub mean_p: Vec<f64>,
    pub mean_f: Vec<f64>,
    pub var_p: Vec<f64>,
    pub cov_pf: Vec<f64>,
}

impl PairedMoments {
    /// An empty accumulator for outputs of width `dim`.
    pub fn new(dim: usize) -> Self {
        let z = vec![0.0; dim];
        Self {
            dim,
            count: 0,
            sp: z.clone(),
            sf: z.clone(),
            spp: z.clone(),
            sff: z.clone(),
            spf: z.clone(),
            cp: z.clone(),
            cf: z.clone(),
            dp: z.clone(),
            df: z.clone(),
            dpp: z.clone(),
            dpf: z,
        }
    }
    /// Output width.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of rows (tokens) seen.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Add chunks `pruned` and `full`, both (tokens, dim), row t of one paired with row t of
    /// the other. Errors: `ShapeMismatch` (columns, or different token counts), `NonFinite`
    /// (naming `pruned` or `full`), before anything is added.
    pub fn update<T: Element>(&mut self, pruned: MatRef<'_, T>, full: MatRef<'_, T>) -> Result<()> {
        check_cols(pruned, self.dim, "pruned")?;
        check_cols(full, self.dim, "full")?;
        if full.nrows() != pruned.nrows() {
            return Err(shape_mismatch(
                "full rows (tokens)",
                pruned.nrows(),
                full.nrows(),
            ));
        }
        check_finite(pruned, "pruned")?;
        check_finite(full, "full")?;
        let n = pruned.nrows();
        if n == 0 {
            return Ok(());
        }
        if self.count == 0 {
            for c in 0..self.dim {
                self.cp[c] = pruned[(0, c)].to_f64();
                self.cf[c] = full[(0, c)].to_f64();
            }
        }
        let dim = self.dim;
        let (mut bp, mut bf) = (Vec::new(), Vec::new());
        let (lp, lf) = (lines(pruned, &mut bp), lines(full, &mut bf));
        // Per coordinate: Σp, Σf, Σp², Σf², Σpf, Σ(p-cp), Σ(f-cf), Σ(p-cp)², Σ(p-cp)(f-cf).
        let mut acc = vec![[0.0f64; 9]; dim];
        #[inline(always)]
        fn add(a: &mut [f64; 9], p: f64, f: f64, cp: f64, cf: f64) {
            a[0] += p;
            a[1] += f;
            a[2] += p * p;
            a[3] += f * f;
            a[4] += p * f;
            let (u, v) = (p - cp, f - cf);
            a[5] += u;
            a[6] += v;
            a[7] += u * u;
            a[8] += u * v;
        }
        match (&lp, &lf) {
            (Lines::Cols(pc), Lines::Cols(fc)) => {
                for (c, a) in acc.iter_mut().enumerate() {
                    let (cp, cf) = (self.cp[c], self.cf[c]);
                    for (p, f) in pc[c].iter().zip(fc[c].iter()) {
                        add(a, p.to_f64(), f.to_f64(), cp, cf);
                    }
                }
            }
            _ => {
                // Row by row; a column-major input is transposed into a row-major copy first.
                let to_rows = |l: &Lines<'_, T>| -> Vec<f64> {
                    let mut out = vec![0.0; n * dim];
                    match l {
                        Lines::Rows(rows) => {
                            for (r, row) in rows.iter().enumerate() {
                                for (o, v) in out[r * dim..(r + 1) * dim].iter_mut().zip(row.iter())
                                {
                                    *o = v.to_f64();
                                }
                            }
                        }
                        Lines::Cols(cols) => {
                            for (c, col) in cols.iter().enumerate() {
                                for (r, v) in col.iter().enumerate() {
                                    out[r * dim + c] = v.to_f64();
                                }
                            }
                        }
                    }
                    out
                };
                let (rp, rf) = (to_rows(&lp), to_rows(&lf));
                for r in 0..n {
                    let (prow, frow) = (&rp[r * dim..(r + 1) * dim], &rf[r * dim..(r + 1) * dim]);
                    for c in 0..dim {
                        add(&mut acc[c], prow[c], frow[c], self.cp[c], self.cf[c]);
                    }
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            self.sp[c] += a[0];
            self.sf[c] += a[1];
            self.spp[c] += a[2];
            self.sff[c] += a[3];
            self.spf[c] += a[4];
            self.dp[c] += a[5];
            self.df[c] += a[6];
            self.dpp[c] += a[7];
            self.dpf[c] += a[8];
        }
        self.count += n as u64;
        Ok(())
    }
    /// Add another accumulator's rows. Errors: `ShapeMismatch` on different `dim`.
    pub fn merge(&mut self, other: &PairedMoments) -> Result<()> {
        if other.dim != self.dim {
            return Err(shape_mismatch(
                "merged paired moments dim",
                self.dim,
                other.dim,
            ));
        }
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        let no = as_f64(other.count);
        for c in 0..self.dim {
            self.sp[c] += other.sp[c];
            self.sf[c] += other.sf[c];
            self.spp[c] += other.spp[c];
            self.sff[c] += other.sff[c];
            self.spf[c] += other.spf[c];
            // p - cp_s = (p - cp_o) + ep, likewise for f
            let ep = other.cp[c] - self.cp[c];
            let ef = other.cf[c] - self.cf[c];
            self.dpp[c] += other.dpp[c] + 2.0 * ep * other.dp[c] + no * ep * ep;
            self.dpf[c] += other.dpf[c] + ep * other.df[c] + ef * other.dp[c] + no * ep * ef;
            self.dp[c] += other.dp[c] + no * ep;
            self.df[c] += other.df[c] + no * ef;
        }
        self.count += other.count;
        Ok(())
    }
    /// The exact internal state: `count` and, each of length `dim`, in this order: Σp, Σf,
    /// Σp², Σf², Σp·f, the shifts cp, cf (the first row) and the shifted sums Σ(p−cp),
    /// Σ(f−cf), Σ(p−cp)², Σ(p−cp)(f−cf). [`PairedMoments::from_parts`] rebuilds it exactly.
    pub fn parts(&self) -> (u64, [&[f64]; PAIRED_PARTS]) {
        (
            self.count,
            [
                &self.sp, &self.sf, &self.spp, &self.sff, &self.spf, &self.cp, &self.cf,
                &self.dp, &self.df, &self.dpp, &self.dpf,
            ],
        )
    }

    /// Rebuild an accumulator from [`PairedMoments::parts`] (dim = `parts[0].len()`).
    /// Errors: `ShapeMismatch` (parts of different lengths), `NonFinite`.
    pub fn from_parts(count: u64, parts: [Vec<f64>; PAIRED_PARTS]) -> Result<Self> {
        let dim = parts[0].len();
        for (k, part) in parts.iter().enumerate() {
            if part.len() != dim {
                return Err(shape_mismatch(format!("paired moments part {k} length"), dim, part.len()));
            }
            check_finite_slice(part, "paired moments part")?;
        }
        let [sp, sf, spp, sff, spf, cp, cf, dp, df, dpp, dpf] = parts;
        Ok(Self { dim, count, sp, sf, spp, sff, spf, cp, cf, dp, df, dpp, dpf })
    }

    /// Σp, Σf, Σp², Σf², Σp·f, each of length `dim`.
    #[allow(clippy::type_complexity)]
    pub fn sums(&self) -> (&[f64], &[f64], &[f64], &[f64], &[f64]) {
        (&self.sp, &self.sf, &self.spp, &self.sff, &self.spf)
    }

    /// Means, variance of p and covariance of (p, f) per coordinate, from the shifted sums.
    pub(crate) fn centred(&self) -> Result<PairedCentred> {
        if self.count == 0 {
            return Err(SlimError::EmptyAccumulator {
                what: "paired moments".to_string(),
            });
        }
        let n = as_f64(self.count);
        let mut out = PairedCentred {
            mean_p: Vec::with_capacity(self.dim),
            mean_f: Vec::with_capacity(self.dim),
            var_p: Vec::with_capacity(self.dim),
            cov_pf: Vec::with_capacity(self.dim),
        };
        for c in 0..self.dim {
            let mp = self.dp[c] / n;
            let mf = self.df[c] / n;
            out.mean_p.push(self.cp[c] + mp);
            out.mean_f.push(self.cf[c] + mf);
            out.var_p.push(self.dpp[c] / n - mp * mp);
            out.cov_pf.push(self.dpf[c] / n - mp * mf);
        }
        Ok(out)
    }
}
