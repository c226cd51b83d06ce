//! Python arguments to core types: non-negative sizes, token-id sequences, pair lists.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use super::errors::request_err;

pub(super) fn nonneg(v: i64, field: &'static str, err: fn(String) -> PyErr) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| err(format!("{field}: {v} must not be negative")))
}

/// Token ids from a contiguous int64 numpy array (fast path) or any sequence of ints.
pub(super) fn extract_tokens(obj: &Bound<'_, PyAny>, field: &'static str) -> PyResult<Vec<i64>> {
    if let Ok(arr) = obj.cast::<PyArray1<i64>>() {
        let ro = arr.readonly();
        if let Ok(s) = ro.as_slice() {
            return Ok(s.to_vec());
        }
    }
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>()
    {
        return Err(request_err(format!(
            "{field}: expected a sequence of ints, got a string"
        )));
    }
    obj.extract::<Vec<i64>>()
        .map_err(|e| request_err(format!("{field}: expected a sequence of ints ({e})")))
}

pub(super) fn pairs(py: Python<'_>, flat: Vec<i64>) -> PyResult<Py<PyArray2<i64>>> {
    let k = flat.len() / 2;
    let a = Array2::from_shape_vec((k, 2), flat)
        .map_err(|e| PyRuntimeError::new_err(format!("internal: bad pair list: {e}")))?;
    Ok(a.into_pyarray(py).unbind())
}
