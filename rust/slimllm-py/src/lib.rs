//! `slimllm._core`: thin PyO3 bindings over slimllm-core (argument conversion, GIL release,
//! error mapping only).
use pyo3::prelude::*;

#[pymodule]
fn _core(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
