//! `slimllm._core`: thin PyO3 bindings over slimllm-core (argument conversion, GIL release,
//! error mapping only). The Python API is documented in `docs/core-api.md`; the maths in
//! DESIGN.md sections 2-4.
//!
//! Conventions:
//! * array arguments are numpy arrays of float32 or float64 (native byte order), C-contiguous
//!   and aligned (anything else raises `TypeError` naming the argument; a wrong number of
//!   dimensions raises `ShapeMismatchError`);
//! * activation chunks are viewed zero-copy; weights given as float32 are converted to float64
//!   once (without the GIL); float64 weights are viewed zero-copy;
//! * every computation runs inside `py.detach` (the GIL is released) on all rayon threads;
//! * results are float64 arrays (index arrays int64); `SlimError` variants map one-to-one onto
//!   exception classes under `SlimLLMError`, with the Rust `Display` text as message.

use std::borrow::Cow;

use faer::{MatRef, Par};
use numpy::ndarray::{Array2, Array3};
use numpy::prelude::*;
use numpy::{PyArray1, PyArray2, PyArray3, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArray};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use slimllm_core::channels as ch;
use slimllm_core::heads::{self, HeadMode, HeadPairStats};
use slimllm_core::moments as mo;
use slimllm_core::recovery as rec;
use slimllm_core::SlimError;

// ---------------------------------------------------------------------------------------------
// Exceptions
// ---------------------------------------------------------------------------------------------

create_exception!(
    slimllm._core,
    SlimLLMError,
    PyException,
    "Base class of every error slimllm raises on purpose (numerical core and Python side)."
);
create_exception!(
    slimllm._core,
    ShapeMismatchError,
    SlimLLMError,
    "An argument's size disagrees with another's, or an array has the wrong number of \
     dimensions (the message names the argument and axis). DESIGN.md section 4."
);
create_exception!(
    slimllm._core,
    NonFiniteError,
    SlimLLMError,
    "A NaN or infinity in an input (the message gives row and column of the first one). \
     Accumulators are left unchanged. DESIGN.md section 4."
);
create_exception!(
    slimllm._core,
    InvalidCountError,
    SlimLLMError,
    "A count (heads, channels, groups, an index) outside its valid range, e.g. a pruning count \
     that leaves nothing, is not a multiple of the KV-head count, or a repeated index. \
     DESIGN.md section 4."
);
create_exception!(
    slimllm._core,
    InvalidRatioError,
    SlimLLMError,
    "A real-valued setting (ratio, damping, fraction) outside its valid range. DESIGN.md \
     section 4."
);
create_exception!(
    slimllm._core,
    EmptyAccumulatorError,
    SlimLLMError,
    "A statistic was asked of an accumulator that has seen no rows. DESIGN.md section 4."
);
create_exception!(
    slimllm._core,
    NotPositiveDefiniteError,
    SlimLLMError,
    "A Cholesky factorisation failed (ridge reconstruction with a singular system). DESIGN.md \
     section 2 (ridge)."
);

/// Map a core error onto its exception class. Exhaustive on purpose: a new `SlimError`
/// variant does not compile until it has its own class here.
fn to_pyerr(e: SlimError) -> PyErr {
    let msg = e.to_string();
    match e {
        SlimError::ShapeMismatch { .. } => ShapeMismatchError::new_err(msg),
        SlimError::NonFinite { .. } => NonFiniteError::new_err(msg),
        SlimError::InvalidCount { .. } => InvalidCountError::new_err(msg),
        SlimError::InvalidRatio { .. } => InvalidRatioError::new_err(msg),
        SlimError::EmptyAccumulator { .. } => EmptyAccumulatorError::new_err(msg),
        SlimError::NotPositiveDefinite { .. } => NotPositiveDefiniteError::new_err(msg),
    }
}

trait OrPyErr<T> {
    fn py_err(self) -> PyResult<T>;
}
impl<T> OrPyErr<T> for slimllm_core::Result<T> {
    #[inline]
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}

fn shape_err(what: String, expected: usize, got: usize) -> PyErr {
    to_pyerr(SlimError::ShapeMismatch {
        what,
        expected,
        got,
    })
}

/// All rayon threads.
#[inline]
fn par() -> Par {
    Par::rayon(0)
}

// ---------------------------------------------------------------------------------------------
// Array arguments
// ---------------------------------------------------------------------------------------------

/// A borrowed float32/float64 numpy array of a known number of dimensions, C-contiguous.
enum Arr<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
}

/// Element data of an [`Arr`], Send, usable without the GIL.
#[derive(Clone, Copy)]
enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// A row-major view (shape + data) of an [`Arr`].
#[derive(Clone, Copy)]
struct View<'a> {
    data: Data<'a>,
    shape: [usize; 3],
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

/// Extract argument `name` as a C-contiguous float32/float64 array with `ndim` dimensions.
fn arr<'py>(obj: &Bound<'py, PyAny>, name: &str, ndim: usize) -> PyResult<Arr<'py>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "argument `{name}` must be a numpy.ndarray of float32 or float64, got {}",
            type_name(obj)
        ))
    })?;
    let got = untyped.ndim();
    if got != ndim {
        return Err(shape_err(
            format!("{name} (number of dimensions)"),
            ndim,
            got,
        ));
    }
    let borrow_err = |e: numpy::BorrowError| {
        PyRuntimeError::new_err(format!("argument `{name}`: cannot borrow the array: {e}"))
    };
    let a = if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
        Arr::F64(a.try_readonly().map_err(borrow_err)?)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        Arr::F32(a.try_readonly().map_err(borrow_err)?)
    } else {
        let dtype = untyped
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".to_owned());
        return Err(PyTypeError::new_err(format!(
            "argument `{name}` must have dtype float32 or float64 (native byte order), got {dtype}"
        )));
    };
    if !untyped.is_c_contiguous() {
        return Err(PyTypeError::new_err(format!(
            "argument `{name}` must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    // A slice over misaligned elements would be undefined behaviour (numpy allows them, e.g.
    // from `frombuffer` at an odd offset).
    let aligned = match &a {
        Arr::F32(r) => r.data() as usize % std::mem::align_of::<f32>() == 0,
        Arr::F64(r) => r.data() as usize % std::mem::align_of::<f64>() == 0,
    };
    if !aligned {
        return Err(PyTypeError::new_err(format!(
            "argument `{name}` is not aligned in memory (pass a copy: numpy.array(..., copy=True))"
        )));
    }
    Ok(a)
}

impl<'py> Arr<'py> {
    fn shape(&self) -> &[usize] {
        match self {
            Arr::F32(a) => a.shape(),
            Arr::F64(a) => a.shape(),
        }
    }

    fn view(&self) -> View<'_> {
        let s = self.shape();
        let mut shape = [1usize; 3];
        shape[..s.len()].copy_from_slice(s);
        // C-contiguity was checked in `arr`, so `as_slice` cannot fail.
        let data = match self {
            Arr::F32(a) => Data::F32(a.as_slice().expect("C-contiguous array")),
            Arr::F64(a) => Data::F64(a.as_slice().expect("C-contiguous array")),
        };
        View { data, shape }
    }
}

impl<'a> View<'a> {
    fn rows(&self) -> usize {
        self.shape[0]
    }
    fn cols(&self) -> usize {
        self.shape[1]
    }
    /// The data as f64: borrowed when it is f64 already, converted (in parallel) otherwise.
    fn f64(&self) -> Cow<'a, [f64]> {
        match self.data {
            Data::F64(s) => Cow::Borrowed(s),
            Data::F32(s) => Cow::Owned(s.par_iter().map(|&x| x as f64).collect()),
        }
    }
}

/// Row-major f64 matrix view over a buffer.
#[inline]
fn mat(buf: &[f64], rows: usize, cols: usize) -> MatRef<'_, f64> {
    MatRef::from_row_major_slice(buf, rows, cols)
}

/// Row-major copy of a faer matrix (any strides), tiled by blocks of rows so that both the
/// reads (down a column) and the writes (along rows) stay in cache; parallel over row blocks.
fn mat_to_array(m: MatRef<'_, f64>) -> Array2<f64> {
    const BLOCK: usize = 64;
    let (r, c) = (m.nrows(), m.ncols());
    let mut v = vec![0.0f64; r * c];
    if c > 0 {
        v.par_chunks_mut(BLOCK * c)
            .enumerate()
            .for_each(|(b, chunk)| {
                let i0 = b * BLOCK;
                let rows = chunk.len() / c;
                let block = m.subrows(i0, rows);
                for j in 0..c {
                    let col = block.col(j);
                    for i in 0..rows {
                        chunk[i * c + j] = col[i];
                    }
                }
            });
    }
    Array2::from_shape_vec((r, c), v).expect("shape matches length")
}

/// Head-pair statistics from an (units, units, d) array argument named `name`: a float64
/// array is borrowed (no copy), a float32 one converted once.
fn hps_from_view<'a>(v: View<'a>, name: &str) -> slimllm_core::Result<HeadPairStats<'a>> {
    let [u0, u1, d] = v.shape;
    if u0 != u1 {
        return Err(SlimError::ShapeMismatch {
            what: format!("{name} (axis 1, must equal axis 0)"),
            expected: u0,
            got: u1,
        });
    }
    match v.f64() {
        Cow::Borrowed(s) => HeadPairStats::from_slice(u0, d, s),
        Cow::Owned(s) => HeadPairStats::from_vec(u0, d, s),
    }
}

/// A float64 result vector.
type F64Vec<'py> = Bound<'py, PyArray1<f64>>;

fn vec1<'py>(py: Python<'py>, v: Vec<f64>) -> F64Vec<'py> {
    PyArray1::from_vec(py, v)
}

// ---------------------------------------------------------------------------------------------
// Accumulators
// ---------------------------------------------------------------------------------------------

/// Streaming first and second moments of feature vectors x of dimension ``dim``
/// (DESIGN.md section 2, first paragraph): count n, sum s (dim,), Gram S = sum x x^T
/// (dim, dim), all accumulated in float64 whatever the input dtype.
///
/// Methods: ``update(x)``, ``merge(other)``, ``mean()``, ``covariance()``; properties
/// ``dim``, ``count``, ``sum``, ``gram`` (copies).
#[pyclass(module = "slimllm._core")]
pub struct Moments {
    inner: mo::Moments,
}

#[pymethods]
impl Moments {
    #[new]
    fn new(dim: usize) -> Self {
        Moments {
            inner: mo::Moments::new(dim),
        }
    }

    /// Feature dimension (int).
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Number of rows (tokens) seen so far (int).
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// s = sum of all rows, float64 array (dim,) (a copy).
    #[getter]
    fn sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.sum())
    }

    /// S = sum x x^T, float64 array (dim, dim), symmetric (a copy).
    #[getter]
    fn gram<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let inner = &self.inner;
        let a = py.detach(|| mat_to_array(inner.gram()));
        a.into_pyarray(py)
    }

    /// Add a chunk ``x`` of shape (tokens, dim), float32 or float64, C-contiguous (read
    /// zero-copy, upcast to float64 in the sums). Releases the GIL.
    ///
    /// Raises: ``TypeError`` (not an ndarray, other dtype, not C-contiguous),
    /// ``ShapeMismatchError`` (not 2-D, or ``x.shape[1] != dim``), ``NonFiniteError`` (NaN
    /// or inf; nothing is added).
    fn update(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let x = arr(x, "x", 2)?;
        let v = x.view();
        let inner = &mut self.inner;
        py.detach(|| match v.data {
            Data::F32(s) => {
                inner.update(MatRef::from_row_major_slice(s, v.rows(), v.cols()), par())
            }
            Data::F64(s) => {
                inner.update(MatRef::from_row_major_slice(s, v.rows(), v.cols()), par())
            }
        })
        .py_err()
    }

    /// The exact state ``(count, sum, shift, shifted_sum, shifted_gram)``: int, then float64
    /// (dim,), (dim,), (dim,), (dim, dim) (lower triangle, upper zero): sum x, the shift c,
    /// sum (x - c), sum (x - c)(x - c)^T (DESIGN.md section 2). For moving an accumulator
    /// between processes (``slimllm.pruning.distributed``) with ``Moments.from_parts``.
    fn parts<'py>(&self, py: Python<'py>) -> (u64, F64Vec<'py>, F64Vec<'py>, F64Vec<'py>, Bound<'py, PyArray2<f64>>) {
        let (n, s, c, cs, cg) = self.inner.shifted_parts();
        (n, vec1(py, s.to_vec()), vec1(py, c.to_vec()), vec1(py, cs.to_vec()), mat_to_array(cg).into_pyarray(py))
    }

    /// Rebuild a ``Moments`` from ``parts()`` (float64 arrays; dim = len(sum)); merging
    /// rebuilt accumulators gives exactly what merging the originals gives.
    /// Raises ``ShapeMismatchError`` (a length or shape differs from dim), ``NonFiniteError``,
    /// ``TypeError`` (not float64 arrays).
    #[staticmethod]
    fn from_parts(
        count: u64,
        sum: Vec<f64>,
        shift: Vec<f64>,
        shifted_sum: Vec<f64>,
        shifted_gram: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let g = arr(shifted_gram, "shifted_gram", 2)?;
        let v = g.view();
        let buf = v.f64();
        let inner = mo::Moments::from_shifted_parts(count, sum, shift, shifted_sum, mat(&buf, v.rows(), v.cols())).py_err()?;
        Ok(Moments { inner })
    }

    /// Add the rows seen by another ``Moments`` (same result as one accumulator having seen
    /// both streams). Raises ``ShapeMismatchError`` on a different ``dim``.
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        if slf.is(other) {
            let copy = slf.borrow().inner.clone();
            let mut me = slf.borrow_mut();
            let inner = &mut me.inner;
            return py.detach(|| inner.merge(&copy)).py_err();
        }
        let o = other.borrow();
        let mut me = slf.borrow_mut();
        let (inner, oi) = (&mut me.inner, &o.inner);
        py.detach(|| inner.merge(oi)).py_err()
    }

    /// mu = s / n, float64 array (dim,). Raises ``EmptyAccumulatorError`` if no row was seen.
    fn mean<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &self.inner;
        let m = py.detach(|| inner.mean()).py_err()?;
        Ok(vec1(py, m))
    }

    /// Centred (population) covariance C = (S - s s^T / n) / n, float64 array (dim, dim),
    /// symmetric (DESIGN.md section 2). Raises ``EmptyAccumulatorError``.
    fn covariance<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let inner = &self.inner;
        let dim = inner.dim();
        let a = py
            .detach(|| {
                // Written row-major straight into the buffer numpy takes over (no copy).
                let mut v = vec![0.0f64; dim * dim];
                inner
                    .covariance_into(faer::MatMut::from_row_major_slice_mut(&mut v, dim, dim))
                    .map(|()| Array2::from_shape_vec((dim, dim), v).expect("shape matches length"))
            })
            .py_err()?;
        Ok(a.into_pyarray(py))
    }

    fn __repr__(&self) -> String {
        format!(
            "Moments(dim={}, count={})",
            self.inner.dim(),
            self.inner.count()
        )
    }
}

/// The cheap accumulator (DESIGN.md section 3): count and per-feature sum of squares
/// sum x_i^2 in float64.
///
/// Methods: ``update(x)``, ``merge(other)``, ``norms()``; properties ``dim``, ``count``,
/// ``sum_squares`` (a copy).
#[pyclass(module = "slimllm._core")]
pub struct SquareSums {
    inner: mo::SquareSums,
}

#[pymethods]
impl SquareSums {
    #[new]
    fn new(dim: usize) -> Self {
        SquareSums {
            inner: mo::SquareSums::new(dim),
        }
    }

    /// Feature dimension (int).
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Number of rows (tokens) seen so far (int).
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// sum x_i^2 per feature, float64 array (dim,) (a copy).
    #[getter]
    fn sum_squares<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.sum_squares())
    }

    /// Add a chunk ``x`` of shape (tokens, dim), float32 or float64, C-contiguous. Releases
    /// the GIL. Raises: ``TypeError``, ``ShapeMismatchError``, ``NonFiniteError`` (nothing is
    /// added), as ``Moments.update``.
    fn update(&mut self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<()> {
        let x = arr(x, "x", 2)?;
        let v = x.view();
        let inner = &mut self.inner;
        py.detach(|| match v.data {
            Data::F32(s) => {
                inner.update(MatRef::from_row_major_slice(s, v.rows(), v.cols()), par())
            }
            Data::F64(s) => {
                inner.update(MatRef::from_row_major_slice(s, v.rows(), v.cols()), par())
            }
        })
        .py_err()
    }

    /// Rebuild a ``SquareSums`` from ``count`` and ``sum_squares`` (float64 (dim,)), e.g.
    /// sums added up over processes. Raises ``NonFiniteError``.
    #[staticmethod]
    fn from_parts(count: u64, sum_squares: Vec<f64>) -> PyResult<Self> {
        Ok(SquareSums { inner: mo::SquareSums::from_parts(count, sum_squares).py_err()? })
    }

    /// Add the rows seen by another ``SquareSums``. Raises ``ShapeMismatchError`` on a
    /// different ``dim``.
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        if slf.is(other) {
            let copy = slf.borrow().inner.clone();
            let mut me = slf.borrow_mut();
            let inner = &mut me.inner;
            return py.detach(|| inner.merge(&copy)).py_err();
        }
        let o = other.borrow();
        let mut me = slf.borrow_mut();
        let (inner, oi) = (&mut me.inner, &o.inner);
        py.detach(|| inner.merge(oi)).py_err()
    }

    /// l_i = sqrt(sum x_i^2) per feature (the paper's activation norm), float64 array (dim,).
    fn norms<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        let inner = &self.inner;
        let n = py.detach(|| inner.norms());
        vec1(py, n)
    }

    fn __repr__(&self) -> String {
        format!(
            "SquareSums(dim={}, count={})",
            self.inner.dim(),
            self.inner.count()
        )
    }
}

/// Per-coordinate cross statistics of a pruned output p and the full output f of equal
/// width ``dim`` (DESIGN.md section 3, "Recovery"): n, sum p, sum f, sum p^2, sum f^2,
/// sum p*f, in float64. Feeds ``affine_from_paired``.
///
/// Methods: ``update(pruned, full)``, ``merge(other)``; properties ``dim``, ``count``.
#[pyclass(module = "slimllm._core")]
pub struct PairedMoments {
    inner: mo::PairedMoments,
}

#[pymethods]
impl PairedMoments {
    #[new]
    fn new(dim: usize) -> Self {
        PairedMoments {
            inner: mo::PairedMoments::new(dim),
        }
    }

    /// Output width (int).
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Number of rows (tokens) seen so far (int).
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// Add chunks ``pruned`` and ``full``, both (tokens, dim), float32 or float64,
    /// C-contiguous (if their dtypes differ the float32 one is upcast). Releases the GIL.
    /// Raises: ``TypeError``, ``ShapeMismatchError``, ``NonFiniteError`` (nothing is added).
    fn update(
        &mut self,
        py: Python<'_>,
        pruned: &Bound<'_, PyAny>,
        full: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let p = arr(pruned, "pruned", 2)?;
        let f = arr(full, "full", 2)?;
        let (pv, fv) = (p.view(), f.view());
        let inner = &mut self.inner;
        py.detach(|| match (pv.data, fv.data) {
            (Data::F32(ps), Data::F32(fs)) => inner.update(
                MatRef::from_row_major_slice(ps, pv.rows(), pv.cols()),
                MatRef::from_row_major_slice(fs, fv.rows(), fv.cols()),
            ),
            _ => {
                let (pb, fb) = (pv.f64(), fv.f64());
                inner.update(
                    mat(&pb, pv.rows(), pv.cols()),
                    mat(&fb, fv.rows(), fv.cols()),
                )
            }
        })
        .py_err()
    }

    /// The exact state ``(count, parts)``: parts float64 (11, dim), rows sum p, sum f,
    /// sum p^2, sum f^2, sum p*f, the shifts cp, cf and sum (p-cp), sum (f-cf),
    /// sum (p-cp)^2, sum (p-cp)(f-cf) (DESIGN.md section 3, "Recovery").
    fn parts<'py>(&self, py: Python<'py>) -> (u64, Bound<'py, PyArray2<f64>>) {
        let (n, parts) = self.inner.parts();
        let dim = self.inner.dim();
        let a = Array2::from_shape_fn((mo::PAIRED_PARTS, dim), |(k, c)| parts[k][c]);
        (n, a.into_pyarray(py))
    }

    /// Rebuild a ``PairedMoments`` from ``parts()``. Raises ``ShapeMismatchError`` (parts not
    /// (11, dim)), ``NonFiniteError``.
    #[staticmethod]
    fn from_parts(count: u64, parts: &Bound<'_, PyAny>) -> PyResult<Self> {
        let p = arr(parts, "parts", 2)?;
        let v = p.view();
        if v.rows() != mo::PAIRED_PARTS {
            return Err(shape_err("parts rows".to_string(), mo::PAIRED_PARTS, v.rows()));
        }
        let buf = v.f64();
        let cols = v.cols();
        let vecs: [Vec<f64>; mo::PAIRED_PARTS] = std::array::from_fn(|k| buf[k * cols..(k + 1) * cols].to_vec());
        Ok(PairedMoments { inner: mo::PairedMoments::from_parts(count, vecs).py_err()? })
    }

    /// Add the rows seen by another ``PairedMoments``. Raises ``ShapeMismatchError`` on a
    /// different ``dim``.
    fn merge(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        if slf.is(other) {
            let copy = slf.borrow().inner.clone();
            let mut me = slf.borrow_mut();
            let inner = &mut me.inner;
            return py.detach(|| inner.merge(&copy)).py_err();
        }
        let o = other.borrow();
        let mut me = slf.borrow_mut();
        let (inner, oi) = (&mut me.inner, &o.inner);
        py.detach(|| inner.merge(oi)).py_err()
    }

    fn __repr__(&self) -> String {
        format!(
            "PairedMoments(dim={}, count={})",
            self.inner.dim(),
            self.inner.count()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Heads
// ---------------------------------------------------------------------------------------------

/// Outcome of ``select_heads`` (frozen). Index lists are sorted ascending.
///
/// Attributes: ``kept``, ``pruned`` (query heads), ``pruned_kv_heads`` (KV heads removed,
/// empty in "uniform" mode): list[int]; ``objective`` (F(kept) after the search),
/// ``initial_objective`` (F of the score-based selection, before any swap): float;
/// ``swaps`` (swaps applied by the greedy search): int.
#[pyclass(module = "slimllm._core", frozen, get_all, eq)]
#[derive(PartialEq)]
pub struct HeadSelection {
    kept: Vec<usize>,
    pruned: Vec<usize>,
    pruned_kv_heads: Vec<usize>,
    objective: f64,
    initial_objective: f64,
    swaps: usize,
}

#[pymethods]
impl HeadSelection {
    fn __repr__(&self) -> String {
        format!(
            "HeadSelection(kept={:?}, pruned={:?}, pruned_kv_heads={:?}, objective={:?}, \
             initial_objective={:?}, swaps={})",
            self.kept,
            self.pruned,
            self.pruned_kv_heads,
            self.objective,
            self.initial_objective,
            self.swaps
        )
    }
}

impl From<heads::HeadSelection> for HeadSelection {
    fn from(s: heads::HeadSelection) -> Self {
        HeadSelection {
            kept: s.kept,
            pruned: s.pruned,
            pruned_kv_heads: s.pruned_kv_heads,
            objective: s.objective,
            initial_objective: s.initial_objective,
            swaps: s.swaps,
        }
    }
}

/// Head-pair statistics M[a, b, j] = W_o[j, a]^T C[a, b] W_o[j, b] (DESIGN.md section 2).
///
/// ``cov``: (D, D) covariance of the o_proj input (``Moments.covariance()``); ``w_o``: (d, D)
/// o_proj weight; both float32 or float64, C-contiguous. ``num_heads``: H (divides D).
/// Returns float64 array (H, H, d). Releases the GIL.
///
/// Raises: ``TypeError``; ``ShapeMismatchError`` (cov not square, cov vs w_o columns, D not
/// divisible by H); ``InvalidCountError`` (``num_heads == 0``); ``NonFiniteError``.
#[pyfunction]
fn head_pair_stats<'py>(
    py: Python<'py>,
    cov: &Bound<'py, PyAny>,
    w_o: &Bound<'py, PyAny>,
    num_heads: usize,
) -> PyResult<Bound<'py, PyArray3<f64>>> {
    let c = arr(cov, "cov", 2)?;
    let w = arr(w_o, "w_o", 2)?;
    let (cv, wv) = (c.view(), w.view());
    let out = py
        .detach(|| {
            let (cb, wb) = (cv.f64(), wv.f64());
            let m = HeadPairStats::compute(
                mat(&cb, cv.rows(), cv.cols()),
                mat(&wb, wv.rows(), wv.cols()),
                num_heads,
                par(),
            )?;
            let (u, d) = (m.units(), m.out_dim());
            Ok(Array3::from_shape_vec((u, u, d), m.into_vec()).expect("(H, H, d) data"))
        })
        .py_err()?;
    Ok(out.into_pyarray(py))
}

/// Paper head score: score[a] = F(all heads except a), F(K) = sum_j |rho_j(K)|; high score =
/// removing head a changes little = prune first (DESIGN.md section 2).
///
/// ``m``: (H, H, d) float32/float64 array from ``head_pair_stats``. Returns float64 (H,).
/// Raises: ``TypeError``, ``ShapeMismatchError``, ``NonFiniteError``.
#[pyfunction]
fn head_scores<'py>(py: Python<'py>, m: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let a = arr(m, "m", 3)?;
    let v = a.view();
    let s = py
        .detach(|| hps_from_view(v, "m").map(|h| h.scores()))
        .py_err()?;
    Ok(vec1(py, s))
}

/// Pearson objective F(K) = sum_j |rho_j(K)| of the kept heads ``kept`` (sequence of int),
/// rho_j = cov(y_K,j, y_j) / sqrt(var(y_K,j) var(y_j)); a coordinate with zero variance
/// contributes 0 (DESIGN.md section 2). ``m``: (H, H, d) float32/float64. Returns float.
///
/// Raises: ``TypeError``, ``ShapeMismatchError``, ``NonFiniteError``, ``InvalidCountError``
/// (index out of range or repeated).
#[pyfunction]
fn head_objective(py: Python<'_>, m: &Bound<'_, PyAny>, kept: Vec<usize>) -> PyResult<f64> {
    let a = arr(m, "m", 3)?;
    let v = a.view();
    py.detach(|| hps_from_view(v, "m")?.objective(&kept))
        .py_err()
}

/// Choose the query heads to remove (DESIGN.md section 2; paper Algorithm 1): the ``n_prune``
/// highest scores, then if ``greedy`` the swap search (each pruned head, in descending score
/// order, is swapped with the kept head that raises F(K) most, if any does).
///
/// ``m``: (H, H, d) float32/float64 from ``head_pair_stats``. ``num_kv_heads``: G (divides H).
/// ``mode``: ``"uniform"`` (``n_prune`` query heads, a multiple of G, the same count from every
/// KV group; swaps stay inside a group) or ``"kv-group"`` (``n_prune`` whole KV groups).
/// Returns a ``HeadSelection``. Releases the GIL.
///
/// Raises: ``ValueError`` (unknown mode), ``TypeError``, ``ShapeMismatchError``,
/// ``NonFiniteError``, ``InvalidCountError`` (n_prune leaves no head or is not a multiple of
/// G; G does not divide H).
#[pyfunction]
#[pyo3(signature = (m, n_prune, num_kv_heads, mode = "uniform", greedy = true))]
fn select_heads(
    py: Python<'_>,
    m: &Bound<'_, PyAny>,
    n_prune: usize,
    num_kv_heads: usize,
    mode: &str,
    greedy: bool,
) -> PyResult<HeadSelection> {
    let mode = match mode {
        "uniform" => HeadMode::Uniform,
        "kv-group" => HeadMode::KvGroup,
        other => {
            return Err(PyValueError::new_err(format!(
                "mode must be \"uniform\" or \"kv-group\", got {other:?}"
            )))
        }
    };
    let a = arr(m, "m", 3)?;
    let v = a.view();
    let sel = py
        .detach(|| {
            let h = hps_from_view(v, "m")?;
            heads::select_heads(&h, n_prune, num_kv_heads, mode, greedy)
        })
        .py_err()?;
    Ok(sel.into())
}

// ---------------------------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------------------------

/// PCA-weighted MLP channel score (DESIGN.md section 3). ``in_sumsq`` (d,): sum of squares of
/// the MLP input per hidden dimension; ``act_sumsq`` (F,): sum of squares of the intermediate
/// activation per channel; ``y_cov`` (d, d): covariance of the MLP output (decomposed with a
/// self-adjoint eigensolver); ``w_gate``, ``w_up`` (F, d); ``w_down`` (d, F). All float32 or
/// float64, C-contiguous.
///
/// Returns a tuple ``(gate, up, down)`` of float64 (F,) arrays: I_gate = ||W_gate[c] * l_in||,
/// I_up = ||W_up[c] * l_in||, I_down = l_a[c] * || |W_down[:, c]^T V| * w ||; the total score
/// is their sum, low = prune. Releases the GIL.
///
/// Raises: ``TypeError``, ``ShapeMismatchError``, ``NonFiniteError``.
#[pyfunction]
fn channel_scores<'py>(
    py: Python<'py>,
    in_sumsq: &Bound<'py, PyAny>,
    act_sumsq: &Bound<'py, PyAny>,
    y_cov: &Bound<'py, PyAny>,
    w_gate: &Bound<'py, PyAny>,
    w_up: &Bound<'py, PyAny>,
    w_down: &Bound<'py, PyAny>,
) -> PyResult<(F64Vec<'py>, F64Vec<'py>, F64Vec<'py>)> {
    let a_in = arr(in_sumsq, "in_sumsq", 1)?;
    let a_act = arr(act_sumsq, "act_sumsq", 1)?;
    let a_cov = arr(y_cov, "y_cov", 2)?;
    let a_g = arr(w_gate, "w_gate", 2)?;
    let a_u = arr(w_up, "w_up", 2)?;
    let a_d = arr(w_down, "w_down", 2)?;
    let (vi, va, vc, vg, vu, vd) = (
        a_in.view(),
        a_act.view(),
        a_cov.view(),
        a_g.view(),
        a_u.view(),
        a_d.view(),
    );
    let s = py
        .detach(|| {
            let (bi, ba, bc, bg, bu, bd) =
                (vi.f64(), va.f64(), vc.f64(), vg.f64(), vu.f64(), vd.f64());
            ch::channel_scores(
                &bi,
                &ba,
                mat(&bc, vc.rows(), vc.cols()),
                mat(&bg, vg.rows(), vg.cols()),
                mat(&bu, vu.rows(), vu.cols()),
                mat(&bd, vd.rows(), vd.cols()),
                par(),
            )
        })
        .py_err()?;
    Ok((vec1(py, s.gate), vec1(py, s.up), vec1(py, s.down)))
}

/// Channels to remove (DESIGN.md section 3): order channels by ascending score (ties: lower
/// index first), skip the lowest round_half_even(protect_lowest * F) (the paper's 1% quirk),
/// remove the next ``n_prune``. ``scores``: (F,) float32/float64.
///
/// Returns int64 array (n_prune,), sorted ascending.
///
/// Raises: ``TypeError``, ``ShapeMismatchError`` (not 1-D), ``InvalidCountError``
/// (``n_prune >= F``), ``InvalidRatioError`` (``protect_lowest`` not in [0, 1)),
/// ``NonFiniteError``.
#[pyfunction]
#[pyo3(signature = (scores, n_prune, protect_lowest = 0.01))]
fn select_channels<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    n_prune: usize,
    protect_lowest: f64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let a = arr(scores, "scores", 1)?;
    let v = a.view();
    let idx = py
        .detach(|| {
            let b = v.f64();
            ch::select_channels(&b, n_prune, protect_lowest)
                .map(|ix| ix.into_iter().map(|i| i as i64).collect::<Vec<i64>>())
        })
        .py_err()?;
    Ok(PyArray1::from_vec(py, idx))
}

// ---------------------------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------------------------

/// Per-output-coordinate affine fit of o_proj after head pruning, y_j ~ scale_j y_K,j + bias_j
/// (DESIGN.md section 2, "Recovery"), in closed form from the o_proj-input ``moments``
/// (``Moments`` of dim D), ``w_o`` (d, D) float32/float64, the head-pair statistics ``m``
/// (H, H, d) of the same input, and the kept query heads ``kept`` (sequence of int). No second
/// pass over the data. scale_j = cov(y_K,j, y_j) / var(y_K,j) (1 where that variance is 0),
/// bias_j = mean(y_j) - scale_j mean(y_K,j); a layer that had a bias b adds b to the bias.
///
/// Returns ``(scale, bias)``, float64 (d,) each. Raises: ``TypeError``,
/// ``EmptyAccumulatorError``, ``ShapeMismatchError``, ``InvalidCountError`` (bad head index),
/// ``NonFiniteError``.
#[pyfunction]
fn affine_fit_heads<'py>(
    py: Python<'py>,
    moments: PyRef<'py, Moments>,
    w_o: &Bound<'py, PyAny>,
    m: &Bound<'py, PyAny>,
    kept: Vec<usize>,
) -> PyResult<(F64Vec<'py>, F64Vec<'py>)> {
    let w = arr(w_o, "w_o", 2)?;
    let ma = arr(m, "m", 3)?;
    let (wv, mv) = (w.view(), ma.view());
    let mom = &moments.inner;
    let fit = py
        .detach(|| {
            let h = hps_from_view(mv, "m")?;
            let wb = wv.f64();
            rec::affine_fit_heads(mom, mat(&wb, wv.rows(), wv.cols()), &h, &kept)
        })
        .py_err()?;
    Ok((vec1(py, fit.scale), vec1(py, fit.bias)))
}

/// Per-coordinate affine fit full_j ~ scale_j pruned_j + bias_j from a ``PairedMoments``
/// (DESIGN.md section 3, "Recovery"): scale_j = cov(p_j, f_j) / var(p_j) (1 where that
/// variance is 0), bias_j = mean(f_j) - scale_j mean(p_j).
///
/// Returns ``(scale, bias)``, float64 (dim,) each. Raises ``EmptyAccumulatorError``.
#[pyfunction]
fn affine_from_paired<'py>(
    py: Python<'py>,
    paired: PyRef<'py, PairedMoments>,
) -> PyResult<(F64Vec<'py>, F64Vec<'py>)> {
    let p = &paired.inner;
    let fit = py.detach(|| rec::affine_from_paired(p)).py_err()?;
    Ok((vec1(py, fit.scale), vec1(py, fit.bias)))
}

/// Ridge reconstruction of an output matrix restricted to the kept input columns (DESIGN.md
/// section 2, **beyond**): W' = argmin sum ||W' x_K + b - W x||^2 + lambda ||W'||^2 over the
/// rows seen by ``moments`` (``Moments`` of dim D_in), closed form
/// W'^T = (C_KK + lambda I)^-1 C_K,: W^T, b = W mu - W' mu_K, lambda = damp * mean(diag C_KK)
/// (lambda = damp when that mean is 0). ``w``: (d_out, D_in) float32/float64; ``kept``:
/// sequence of input-column indices (the order of the output columns); ``damp`` >= 0.
///
/// Returns ``(weight, bias)``: float64 (d_out, len(kept)) and (d_out,). Releases the GIL.
///
/// Raises: ``TypeError``, ``EmptyAccumulatorError``, ``ShapeMismatchError``,
/// ``InvalidCountError`` (bad or repeated column), ``InvalidRatioError`` (damp < 0 or not
/// finite), ``NotPositiveDefiniteError``, ``NonFiniteError``.
#[pyfunction]
fn ridge_reconstruct<'py>(
    py: Python<'py>,
    moments: PyRef<'py, Moments>,
    w: &Bound<'py, PyAny>,
    kept: Vec<usize>,
    damp: f64,
) -> PyResult<(Bound<'py, PyArray2<f64>>, F64Vec<'py>)> {
    let wa = arr(w, "w", 2)?;
    let wv = wa.view();
    let mom = &moments.inner;
    let (weight, bias) = py
        .detach(|| {
            let wb = wv.f64();
            rec::ridge_reconstruct(mom, mat(&wb, wv.rows(), wv.cols()), &kept, damp, par())
                .map(|r| (mat_to_array(r.weight.as_ref()), r.bias))
        })
        .py_err()?;
    Ok((weight.into_pyarray(py), vec1(py, bias)))
}

// ---------------------------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------------------------

/// Numerical core of slimllm (Rust): f64 activation moments, attention-head and MLP-channel
/// ranking, greedy head swap, affine and ridge recovery. See docs/core-api.md and DESIGN.md
/// sections 2-4. Every function releases the GIL around its computation.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SlimLLMError", py.get_type::<SlimLLMError>())?;
    m.add("ShapeMismatchError", py.get_type::<ShapeMismatchError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("InvalidCountError", py.get_type::<InvalidCountError>())?;
    m.add("InvalidRatioError", py.get_type::<InvalidRatioError>())?;
    m.add(
        "EmptyAccumulatorError",
        py.get_type::<EmptyAccumulatorError>(),
    )?;
    m.add(
        "NotPositiveDefiniteError",
        py.get_type::<NotPositiveDefiniteError>(),
    )?;

    m.add_class::<Moments>()?;
    m.add_class::<SquareSums>()?;
    m.add_class::<PairedMoments>()?;
    m.add_class::<HeadSelection>()?;

    m.add_function(wrap_pyfunction!(head_pair_stats, m)?)?;
    m.add_function(wrap_pyfunction!(head_scores, m)?)?;
    m.add_function(wrap_pyfunction!(head_objective, m)?)?;
    m.add_function(wrap_pyfunction!(select_heads, m)?)?;
    m.add_function(wrap_pyfunction!(channel_scores, m)?)?;
    m.add_function(wrap_pyfunction!(select_channels, m)?)?;
    m.add_function(wrap_pyfunction!(affine_fit_heads, m)?)?;
    m.add_function(wrap_pyfunction!(affine_from_paired, m)?)?;
    m.add_function(wrap_pyfunction!(ridge_reconstruct, m)?)?;
    Ok(())
}
