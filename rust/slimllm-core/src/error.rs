//! The one error type of the crate.

/// Every failure of `slimllm-core`, with the sizes or index that caused it.
///
/// The Python bindings map each variant to its own exception class under
/// `slimllm.SlimLLMError`, so add a variant here only together with its mapping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SlimError {
    /// An argument's size disagrees with another's (`what` names the argument and axis).
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: String,
        expected: usize,
        got: usize,
    },
    /// A NaN or infinity in an input (`row`, `col` of the first one found).
    #[error("non-finite value in {what} at row {row}, column {col}")]
    NonFinite {
        what: String,
        row: usize,
        col: usize,
    },
    /// A count (heads, channels, groups, an index) outside its valid range `0..=max`.
    #[error("invalid count for {what}: {value} (allowed 0..={max})")]
    InvalidCount {
        what: String,
        value: usize,
        max: usize,
    },
    /// A real-valued setting (ratio, damping, fraction) outside its valid range.
    #[error("invalid value for {what}: {value} (allowed {allowed})")]
    InvalidRatio {
        what: String,
        value: f64,
        allowed: String,
    },
    /// A statistic asked of an accumulator that has seen no rows.
    #[error("empty accumulator: {what} has seen no rows")]
    EmptyAccumulator { what: String },
    /// A Cholesky factorisation failed at `pivot` (matrix of size `dim`).
    #[error("matrix {what} ({dim}x{dim}) is not positive definite (pivot {pivot})")]
    NotPositiveDefinite {
        what: String,
        dim: usize,
        pivot: usize,
    },
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, SlimError>;
