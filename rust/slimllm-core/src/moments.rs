//! Streaming activation statistics in f64 (DESIGN.md section 2, first paragraph; section 4).
//!
//! Inputs are row-major chunks of shape (tokens, features), f32 or f64; every sum is kept in
//! f64 whatever the input type.

use faer::{Mat, MatRef, Par};

use crate::error::Result;

/// Scalar types an accumulator accepts (f32 and f64), upcast to f64 on the way in.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
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

/// First and second moments of a stream of feature vectors x (dimension `dim`):
/// count n, sum s = Σ x (dim), Gram S = Σ x xᵀ (dim × dim), all f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /* fields: implementer's choice */
}

impl Moments {
    /// An empty accumulator for `dim` features.
    pub fn new(dim: usize) -> Self {
        todo!()
    }
    /// Feature dimension.
    pub fn dim(&self) -> usize {
        todo!()
    }
    /// Number of rows (tokens) seen.
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// s = Σ x, length `dim`.
    pub fn sum(&self) -> &[f64] {
        todo!()
    }
    /// S = Σ x xᵀ, `dim × dim` (symmetric, both triangles filled).
    pub fn gram(&self) -> MatRef<'_, f64> {
        todo!()
    }
    /// Add a chunk `x` of shape (tokens, dim). Errors: `ShapeMismatch` if `x.ncols() != dim`,
    /// `NonFinite` (row, col of the first bad value) before anything is added.
    pub fn update<T: Element>(&mut self, x: MatRef<'_, T>, par: Par) -> Result<()> {
        todo!()
    }
    /// Add another accumulator's rows (same result as having seen both streams).
    /// Errors: `ShapeMismatch` on different `dim`.
    pub fn merge(&mut self, other: &Moments) -> Result<()> {
        todo!()
    }
    /// Mean μ = s / n. Errors: `EmptyAccumulator`.
    pub fn mean(&self) -> Result<Vec<f64>> {
        todo!()
    }
    /// Centred (population) covariance C = (S − s sᵀ / n) / n, `dim × dim`, symmetric.
    /// Errors: `EmptyAccumulator`.
    pub fn covariance(&self) -> Result<Mat<f64>> {
        todo!()
    }
}

/// The cheap variant: count and per-feature sum of squares Σ x_i² only (DESIGN.md section 3).
#[derive(Debug, Clone, PartialEq)]
pub struct SquareSums {
    /* fields: implementer's choice */
}

impl SquareSums {
    pub fn new(dim: usize) -> Self {
        todo!()
    }
    pub fn dim(&self) -> usize {
        todo!()
    }
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// Σ x_i² per feature, length `dim`.
    pub fn sum_squares(&self) -> &[f64] {
        todo!()
    }
    /// Same errors as [`Moments::update`].
    pub fn update<T: Element>(&mut self, x: MatRef<'_, T>, par: Par) -> Result<()> {
        todo!()
    }
    pub fn merge(&mut self, other: &SquareSums) -> Result<()> {
        todo!()
    }
    /// l_i = sqrt(Σ x_i²) per feature (the paper's activation norm).
    pub fn norms(&self) -> Vec<f64> {
        todo!()
    }
}

/// Per-coordinate cross statistics of two streams of equal width, a pruned output p and the
/// full output f (DESIGN.md section 3, "Recovery"): n, Σp, Σf, Σp², Σf², Σp·f per coordinate.
/// Feeds [`crate::recovery::affine_from_paired`].
#[derive(Debug, Clone, PartialEq)]
pub struct PairedMoments {
    /* fields: implementer's choice */
}

impl PairedMoments {
    pub fn new(dim: usize) -> Self {
        todo!()
    }
    pub fn dim(&self) -> usize {
        todo!()
    }
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// Add chunks `pruned` and `full`, both (tokens, dim). Errors: `ShapeMismatch`, `NonFinite`.
    pub fn update<T: Element>(&mut self, pruned: MatRef<'_, T>, full: MatRef<'_, T>) -> Result<()> {
        todo!()
    }
    pub fn merge(&mut self, other: &PairedMoments) -> Result<()> {
        todo!()
    }
    /// Σp, Σf, Σp², Σf², Σp·f, each of length `dim`.
    pub fn sums(&self) -> (&[f64], &[f64], &[f64], &[f64], &[f64]) {
        todo!()
    }
}
