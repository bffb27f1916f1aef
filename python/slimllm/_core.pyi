"""Type stubs of ``slimllm._core``, the native numerical core (Rust, PyO3).

See docs/core-api.md for the API and DESIGN.md sections 2-4 for the maths. Array arguments are
float32 or float64 numpy arrays, C-contiguous (anything else raises ``TypeError`` naming the
argument; a wrong number of dimensions raises ``ShapeMismatchError``). Results are float64
(index arrays int64). Every function releases the GIL around its computation.
"""

from collections.abc import Sequence
from typing import Literal, final

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32] | NDArray[np.float64]
F64Array = NDArray[np.float64]

# ---------------------------------------------------------------------------- exceptions

class SlimLLMError(Exception):
    """Base class of every error slimllm raises on purpose."""

class ShapeMismatchError(SlimLLMError):
    """An argument's size disagrees with another's, or an array has the wrong ndim."""

class NonFiniteError(SlimLLMError):
    """A NaN or infinity in an input; accumulators are left unchanged."""

class InvalidCountError(SlimLLMError):
    """A count (heads, channels, groups, an index) outside its valid range."""

class InvalidRatioError(SlimLLMError):
    """A real-valued setting (ratio, damping, fraction) outside its valid range."""

class EmptyAccumulatorError(SlimLLMError):
    """A statistic was asked of an accumulator that has seen no rows."""

class NotPositiveDefiniteError(SlimLLMError):
    """A Cholesky factorisation failed."""

# ---------------------------------------------------------------------------- accumulators

class Moments:
    """Count n, sum s (dim,), Gram S = sum x x^T (dim, dim), all float64 (DESIGN.md 2)."""

    def __init__(self, dim: int) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def sum(self) -> F64Array:
        """s, shape (dim,) (a copy)."""
    @property
    def gram(self) -> F64Array:
        """S, shape (dim, dim) (a copy)."""
    def update(self, x: FloatArray) -> None:
        """Add a (tokens, dim) chunk. Raises TypeError, ShapeMismatchError, NonFiniteError."""
    def merge(self, other: Moments) -> None:
        """Add another accumulator's rows. Raises ShapeMismatchError."""
    def parts(self) -> tuple[int, F64Array, F64Array, F64Array, F64Array]:
        """(count, sum (dim,), shift (dim,), shifted_sum (dim,), shifted_gram (dim, dim),
        lower triangle): the exact state, for moving it between processes."""
    @staticmethod
    def from_parts(count: int, sum: F64Array, shift: F64Array, shifted_sum: F64Array,
                   shifted_gram: F64Array) -> Moments:
        """Rebuild from parts(). Raises ShapeMismatchError, NonFiniteError, TypeError."""
    def mean(self) -> F64Array:
        """mu = s / n, shape (dim,). Raises EmptyAccumulatorError."""
    def covariance(self) -> F64Array:
        """C = (S - s s^T / n) / n, shape (dim, dim). Raises EmptyAccumulatorError."""

class SquareSums:
    """Count and per-feature sum of squares, float64 (DESIGN.md 3)."""

    def __init__(self, dim: int) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def sum_squares(self) -> F64Array:
        """sum x_i^2 per feature, shape (dim,) (a copy)."""
    def update(self, x: FloatArray) -> None:
        """Add a (tokens, dim) chunk. Raises TypeError, ShapeMismatchError, NonFiniteError."""
    def merge(self, other: SquareSums) -> None:
        """Add another accumulator's rows. Raises ShapeMismatchError."""
    @staticmethod
    def from_parts(count: int, sum_squares: F64Array) -> SquareSums:
        """Rebuild from count and sum_squares (dim,). Raises NonFiniteError."""
    def norms(self) -> F64Array:
        """sqrt(sum x_i^2) per feature, shape (dim,)."""

class PairedMoments:
    """Per-coordinate stats of pruned p and full f outputs (DESIGN.md 3, Recovery)."""

    def __init__(self, dim: int) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    def update(self, pruned: FloatArray, full: FloatArray) -> None:
        """Add (tokens, dim) chunks. Raises TypeError, ShapeMismatchError, NonFiniteError."""
    def merge(self, other: PairedMoments) -> None:
        """Add another accumulator's rows. Raises ShapeMismatchError."""
    def parts(self) -> tuple[int, F64Array]:
        """(count, parts (11, dim)): sums, shifts and shifted sums, the exact state."""
    @staticmethod
    def from_parts(count: int, parts: F64Array) -> PairedMoments:
        """Rebuild from parts(). Raises ShapeMismatchError, NonFiniteError."""

# ---------------------------------------------------------------------------- heads

@final
class HeadSelection:
    """Outcome of select_heads (frozen); index lists sorted ascending."""

    @property
    def kept(self) -> list[int]: ...
    @property
    def pruned(self) -> list[int]: ...
    @property
    def pruned_kv_heads(self) -> list[int]: ...
    @property
    def objective(self) -> float: ...
    @property
    def initial_objective(self) -> float: ...
    @property
    def swaps(self) -> int: ...

def head_pair_stats(cov: FloatArray, w_o: FloatArray, num_heads: int) -> F64Array:
    """M[a, b, j] = W_o[j, a]^T C[a, b] W_o[j, b]: cov (D, D), w_o (d, D) -> (H, H, d)."""

def head_scores(m: FloatArray) -> F64Array:
    """score[a] = F(all heads but a), shape (H,); high = prune first."""

def head_objective(m: FloatArray, kept: Sequence[int]) -> float:
    """F(K) = sum_j |rho_j(K)|."""

def select_heads(
    m: FloatArray,
    n_prune: int,
    num_kv_heads: int,
    mode: Literal["uniform", "kv-group"] = "uniform",
    greedy: bool = True,
) -> HeadSelection:
    """Score-based selection plus the greedy swap of Algorithm 1 (GQA-aware)."""

# ---------------------------------------------------------------------------- channels

def channel_scores(
    in_sumsq: FloatArray,
    act_sumsq: FloatArray,
    y_cov: FloatArray,
    w_gate: FloatArray,
    w_up: FloatArray,
    w_down: FloatArray,
) -> tuple[F64Array, F64Array, F64Array]:
    """(gate, up, down) score terms, each (F,); total = their sum, low = prune."""

def select_channels(
    scores: FloatArray, n_prune: int, protect_lowest: float = 0.01
) -> NDArray[np.int64]:
    """Pruned channels (n_prune,), sorted, skipping the lowest protect_lowest fraction."""

# ---------------------------------------------------------------------------- recovery

def affine_fit_heads(
    moments: Moments, w_o: FloatArray, m: FloatArray, kept: Sequence[int]
) -> tuple[F64Array, F64Array]:
    """(scale (d,), bias (d,)) of y_j ~ scale_j y_K,j + bias_j, from the moments."""

def affine_from_paired(paired: PairedMoments) -> tuple[F64Array, F64Array]:
    """(scale (dim,), bias (dim,)) of full_j ~ scale_j pruned_j + bias_j."""

def ridge_reconstruct(
    moments: Moments, w: FloatArray, kept: Sequence[int], damp: float
) -> tuple[F64Array, F64Array]:
    """(weight (d_out, len(kept)), bias (d_out,)) of the ridge fit on the kept columns."""

__all__ = [
    "SlimLLMError",
    "ShapeMismatchError",
    "NonFiniteError",
    "InvalidCountError",
    "InvalidRatioError",
    "EmptyAccumulatorError",
    "NotPositiveDefiniteError",
    "Moments",
    "SquareSums",
    "PairedMoments",
    "HeadSelection",
    "head_pair_stats",
    "head_scores",
    "head_objective",
    "select_heads",
    "channel_scores",
    "select_channels",
    "affine_fit_heads",
    "affine_from_paired",
    "ridge_reconstruct",
]
