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
        /// The argument and axis, e.g. "w_o columns".
        what: String,
        /// The size implied by the other arguments.
        expected: usize,
        /// The size received.
        got: usize,
    },
    /// A NaN or infinity in an input (`row`, `col` of the first one found).
    #[error("non-finite value in {what} at row {row}, column {col}")]
    NonFinite {
        /// The argument, e.g. "x" or "w_o".
        what: String,
        /// Row of the first bad value (row-major order; the index for a vector).
        row: usize,
        /// Column of the first bad value (0 for a vector).
        col: usize,
    },
    /// A count (heads, channels, groups, an index) outside its valid range `0..=max`.
    #[error("invalid count for {what}: {value} (allowed 0..={max})")]
    InvalidCount {
        /// The count or index and its constraint, e.g. "n_prune (KV groups; must leave one)".
        what: String,
        /// The value received.
        value: usize,
        /// The largest valid value.
        max: usize,
    },
    /// A real-valued setting (ratio, damping, fraction) outside its valid range.
    #[error("invalid value for {what}: {value} (allowed {allowed})")]
    InvalidRatio {
        /// The setting, e.g. "damp".
        what: String,
        /// The value received.
        value: f64,
        /// The valid range, in words.
        allowed: String,
    },
    /// A statistic asked of an accumulator that has seen no rows.
    #[error("empty accumulator: {what} has seen no rows")]
    EmptyAccumulator {
        /// The accumulator and the statistic asked of it.
        what: String,
    },
    /// A Cholesky factorisation failed at `pivot` (matrix of size `dim`).
    #[error("matrix {what} ({dim}x{dim}) is not positive definite (pivot {pivot})")]
    NotPositiveDefinite {
        /// The matrix, e.g. "C_KK + lambda I (lambda = 0e0)".
        what: String,
        /// Its size.
        dim: usize,
        /// Index of the first non-positive pivot.
        pivot: usize,
    },
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, SlimError>;
