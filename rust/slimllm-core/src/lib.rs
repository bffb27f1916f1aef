#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Formulas in the docs index with brackets (M[a,b,j], I_gate[c]); they are not links.
#![allow(rustdoc::broken_intra_doc_links)]
//!
//! ## Modules
//!
//! * [`moments`]: streaming f64 activation statistics (count, sum, Gram), mergeable.
//! * [`heads`]: head-pair statistics `M[a,b,j]`, head scores, the Pearson objective and the
//!   greedy swap search of the paper's Algorithm 1, GQA-aware.
//! * [`channels`]: the PCA-weighted MLP channel score.
//! * [`recovery`]: per-output affine fit and ridge reconstruction of a pruned output matrix.
//!
//! Inputs are faer views ([`faer::MatRef`]), outputs are owned; every function that does real
//! work takes an explicit [`faer::Par`] parallelism argument (`Par::Seq`, or `Par::rayon(n)`
//! for the global rayon pool). Formulas are those of the project's DESIGN.md (sections cited
//! on each item). Errors are [`SlimError`] values naming the offending argument.

pub mod channels;
pub mod error;
pub mod heads;
pub mod moments;
pub mod recovery;

pub use error::{Result, SlimError};
pub use faer::Par;
