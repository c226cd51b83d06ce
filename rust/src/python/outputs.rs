//! `Plan` and `StepOutput`: a schedule's and a commit's results as numpy arrays, made from
//! the core's Vecs without a copy.

use numpy::{IntoPyArray, PyArray1, PyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::plan::{Plan, StepOutput};

use super::convert::pairs;

/// One step's batch, as numpy arrays owned by the plan.
#[pyclass(module = "kvserve._core", name = "Plan", frozen)]
pub struct PyPlan {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    num_seqs: usize,
    #[pyo3(get)]
    num_tokens: usize,
    #[pyo3(get)]
    num_decodes: usize,
    #[pyo3(get)]
    handles: Py<PyArray1<u64>>,
    #[pyo3(get)]
    input_ids: Py<PyArray1<i64>>,
    #[pyo3(get)]
    positions: Py<PyArray1<i64>>,
    #[pyo3(get)]
    slot_mapping: Py<PyArray1<i64>>,
    #[pyo3(get)]
    query_start_loc: Py<PyArray1<i32>>,
    #[pyo3(get)]
    seq_lens: Py<PyArray1<i32>>,
    #[pyo3(get)]
    block_table: Py<PyArray2<i32>>,
    #[pyo3(get)]
    logits_indices: Py<PyArray1<i64>>,
    #[pyo3(get)]
    sample_handles: Py<PyArray1<u64>>,
    #[pyo3(get)]
    swap_out: Py<PyArray2<i64>>,
    #[pyo3(get)]
    swap_in: Py<PyArray2<i64>>,
    #[pyo3(get)]
    copies: Py<PyArray2<i64>>,
    #[pyo3(get)]
    offloads: Py<PyArray2<i64>>,
    #[pyo3(get)]
    loads: Py<PyArray2<i64>>,
    #[pyo3(get)]
    must_commit: bool,
    #[pyo3(get)]
    continues_plan_id: Option<u64>,
    #[pyo3(get)]
    advances_in_place: bool,
}

impl PyPlan {
    pub(super) fn from_plan(
        py: Python<'_>,
        p: Plan,
        block_table: Bound<'_, PyArray2<i32>>,
    ) -> PyResult<Self> {
        let must_commit = p.must_commit();
        Ok(PyPlan {
            id: p.id,
            num_seqs: p.num_seqs,
            num_tokens: p.num_tokens,
            num_decodes: p.num_decodes,
            handles: p.handles.into_pyarray(py).unbind(),
            input_ids: p.input_ids.into_pyarray(py).unbind(),
            positions: p.positions.into_pyarray(py).unbind(),
            slot_mapping: p.slot_mapping.into_pyarray(py).unbind(),
            query_start_loc: p.query_start_loc.into_pyarray(py).unbind(),
            seq_lens: p.seq_lens.into_pyarray(py).unbind(),
            block_table: block_table.unbind(),
            logits_indices: p.logits_indices.into_pyarray(py).unbind(),
            sample_handles: p.sample_handles.into_pyarray(py).unbind(),
            swap_out: pairs(py, p.swap_out)?,
            swap_in: pairs(py, p.swap_in)?,
            copies: pairs(py, p.copies)?,
            offloads: pairs(py, p.offloads)?,
            loads: pairs(py, p.loads)?,
            must_commit,
            continues_plan_id: p.continues_plan_id,
            advances_in_place: p.advances_in_place,
        })
    }
}

#[pymethods]
impl PyPlan {
    /// Rows to sample (len(sample_handles)).
    #[getter]
    fn num_samples(&self, py: Python<'_>) -> usize {
        PyUntypedArrayMethods::len(self.sample_handles.bind(py))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Plan(id={}, num_seqs={}, num_tokens={}, num_decodes={}, num_samples={})",
            self.id,
            self.num_seqs,
            self.num_tokens,
            self.num_decodes,
            self.num_samples(py)
        )
    }
}

/// What one commit appended, and who finished.
#[pyclass(module = "kvserve._core", name = "StepOutput", frozen)]
pub struct PyStepOutput {
    #[pyo3(get)]
    handles: Py<PyArray1<u64>>,
    #[pyo3(get)]
    token_ids: Py<PyArray1<i64>>,
    #[pyo3(get)]
    finished_handles: Py<PyArray1<u64>>,
    #[pyo3(get)]
    finish_reasons: Vec<&'static str>,
    #[pyo3(get)]
    finished_ids: Vec<String>,
    #[pyo3(get)]
    finished_cached_prompt_tokens: Py<PyArray1<u64>>,
}

#[pymethods]
impl PyStepOutput {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "StepOutput(num_tokens={}, finished={:?})",
            PyUntypedArrayMethods::len(self.token_ids.bind(py)),
            self.finished_ids
        )
    }
}

impl PyStepOutput {
    pub(super) fn from_output(py: Python<'_>, o: StepOutput) -> Self {
        PyStepOutput {
            handles: o.handles.into_pyarray(py).unbind(),
            token_ids: o.token_ids.into_pyarray(py).unbind(),
            finished_handles: o.finished_handles.into_pyarray(py).unbind(),
            finish_reasons: o.finish_reasons,
            finished_ids: o.finished_ids,
            finished_cached_prompt_tokens: o
                .finished_cached_prompt_tokens
                .into_pyarray(py)
                .unbind(),
        }
    }
}
