//! # slimllm-core
//!
//! The numerical core of [SlimLLM](https://arxiv.org/abs/2505.22689) structured pruning
//! (Guo et al., ICML 2025), usable from Rust without Python.
//!
//! * [`moments`]: streaming f64 activation statistics (count, sum, Gram), mergeable.
//! * [`heads`]: head-pair statistics `M[a,b,j]`, head scores, the Pearson objective and the
//!   greedy swap search of the paper's Algorithm 1, GQA-aware.
//! * [`channels`]: the PCA-weighted MLP channel score.
//! * [`recovery`]: per-output affine fit and ridge reconstruction of a pruned output matrix.
//!
//! Inputs are faer views ([`faer::MatRef`]), outputs are owned; every function that does real
//! work takes an explicit [`faer::Par`] parallelism argument. Formulas are those of the
//! project's DESIGN.md (sections cited on each item).

pub mod channels;
pub mod error;
pub mod heads;
pub mod moments;
pub mod recovery;

pub use error::{Result, SlimError};
pub use faer::Par;
