//! PyO3 bindings: `kvserve._core`. The only place core errors become Python exceptions.
//! Plans and step outputs hand their Vecs to numpy without copying; a plan's block table
//! is a read-only view of a recycled buffer (`PlanTables`).

use numpy::ndarray::{Array2, ArrayView2};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{Config, PreemptionMode};
use crate::error::CoreError;
use crate::metrics::MetricValue;
use crate::plan::{Plan, StepOutput};
use crate::request::RequestParams;
use crate::scheduler::Scheduler;

create_exception!(
    kvserve._core,
    InvalidRequestError,
    PyValueError,
    "A bad request or commit field (the message names it)."
);
create_exception!(
    kvserve._core,
    RequestTooLargeError,
    InvalidRequestError,
    "A request that could never run even alone in an empty cache (the message names the field)."
);
create_exception!(
    kvserve._core,
    ConfigError,
    PyValueError,
    "A bad Core(...) argument (the message names it)."
);
create_exception!(
    kvserve._core,
    AtCapacityError,
    PyRuntimeError,
    "The waiting queue is full; nothing was queued."
);
create_exception!(
    kvserve._core,
    StalePlanError,
    PyRuntimeError,
    "commit() for a plan that is not the latest uncommitted one."
);

fn to_py(e: CoreError) -> PyErr {
    let msg = e.to_string();
    match e {
        CoreError::Config { .. } => ConfigError::new_err(msg),
        CoreError::InvalidRequest { .. } => InvalidRequestError::new_err(msg),
        CoreError::RequestTooLarge { .. } => RequestTooLargeError::new_err(msg),
        CoreError::AtCapacity { .. } => AtCapacityError::new_err(msg),
        CoreError::StalePlan { .. } => StalePlanError::new_err(msg),
        CoreError::UnknownRequest(_) => PyKeyError::new_err(msg),
        CoreError::OutOfBlocks { .. } | CoreError::Invariant(_) => PyRuntimeError::new_err(msg),
    }
}

fn nonneg(v: i64, field: &'static str, err: fn(String) -> PyErr) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| err(format!("{field}: {v} must not be negative")))
}

fn config_err(m: String) -> PyErr {
    ConfigError::new_err(format!("invalid config: {m}"))
}

fn request_err(m: String) -> PyErr {
    InvalidRequestError::new_err(format!("invalid request: {m}"))
}

/// Token ids from a contiguous int64 numpy array (fast path) or any sequence of ints.
fn extract_tokens(obj: &Bound<'_, PyAny>, field: &'static str) -> PyResult<Vec<i64>> {
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

fn pairs(py: Python<'_>, flat: Vec<i64>) -> PyResult<Py<PyArray2<i64>>> {
    let k = flat.len() / 2;
    let a = Array2::from_shape_vec((k, 2), flat)
        .map_err(|e| PyRuntimeError::new_err(format!("internal: bad pair list: {e}")))?;
    Ok(a.into_pyarray(py).unbind())
}

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
}

impl PyPlan {
    fn from_plan(py: Python<'_>, p: Plan, block_table: Bound<'_, PyArray2<i32>>) -> PyResult<Self> {
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
    fn from_output(py: Python<'_>, o: StepOutput) -> Self {
        PyStepOutput {
            handles: o.handles.into_pyarray(py).unbind(),
            token_ids: o.token_ids.into_pyarray(py).unbind(),
            finished_handles: o.finished_handles.into_pyarray(py).unbind(),
            finish_reasons: o.finish_reasons,
            finished_ids: o.finished_ids,
        }
    }
}

/// Recycled memory for plans' block tables. The table is the plan's biggest array
/// (num_seqs x max_blocks) and changes by a few rows per step, so instead of a fresh
/// array per plan each buffer is brought up to date from the rows written since it was
/// last synced. A buffer is reused only when Python holds no view of it (its reference
/// count is ours alone); plans get read-only views, so their contents never change under
/// a caller and the buffer never drifts from what the core synced into it.
#[derive(Default)]
struct PlanTables {
    /// 1-D int32 buffers and the stamp each was last synced at (None: contents unknown).
    bufs: Vec<(Py<PyArray1<i32>>, Option<u64>)>,
}

/// True when the pool's reference is the only one (no plan or view holds the buffer).
fn only_ours(b: &Py<PyArray1<i32>>) -> bool {
    // SAFETY: reading the reference count of a live object while holding the GIL.
    unsafe { ffi::Py_REFCNT(b.as_ptr()) == 1 }
}

/// More buffers than this means a caller keeps many plans alive; extra ones are not kept.
const MAX_PLAN_TABLES: usize = 8;

impl PlanTables {
    fn view<'py>(
        &mut self,
        py: Python<'py>,
        core: &Scheduler,
        rows: usize,
        cols: usize,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let need = rows * cols;
        // A free buffer that is large enough; the most recently synced copies the least.
        let free = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| only_ours(b) && PyUntypedArrayMethods::len(b.bind(py)) >= need)
            .max_by_key(|(_, (_, stamp))| stamp.map_or(0, |s| s + 1))
            .map(|(i, _)| i);
        let i = match free {
            Some(i) => i,
            None => {
                // Headroom so a table that grows by a row or a column keeps its buffer.
                let cap = (need + need / 4).max(256);
                let buf = (vec![-1i32; cap].into_pyarray(py).unbind(), None);
                let spare = self.bufs.iter().position(|(b, _)| only_ours(b));
                match spare {
                    Some(j) => {
                        self.bufs[j] = buf;
                        j
                    }
                    None if self.bufs.len() < MAX_PLAN_TABLES => {
                        self.bufs.push(buf);
                        self.bufs.len() - 1
                    }
                    // Not pooled: filled whole, dropped with its plan.
                    None => return Self::fill(py, core, buf.0, None, rows, cols).map(|(v, _)| v),
                }
            }
        };
        let (buf, stamp) = &self.bufs[i];
        let (view, new_stamp) = Self::fill(py, core, buf.clone_ref(py), *stamp, rows, cols)?;
        self.bufs[i].1 = Some(new_stamp);
        Ok(view)
    }

    /// Syncs the first rows * cols entries of `buf` and returns a read-only 2-D view of
    /// them that keeps `buf` alive.
    fn fill<'py>(
        py: Python<'py>,
        core: &Scheduler,
        buf: Py<PyArray1<i32>>,
        since: Option<u64>,
        rows: usize,
        cols: usize,
    ) -> PyResult<(Bound<'py, PyArray2<i32>>, u64)> {
        let need = rows * cols;
        let base = buf.into_bound(py);
        let stamp = {
            let mut rw = base.readwrite();
            let data = rw
                .as_slice_mut()
                .map_err(|e| PyRuntimeError::new_err(format!("internal: plan table: {e}")))?;
            core.sync_block_table(&mut data[..need], since)
                .map_err(to_py)?
        };
        let ptr = base.data() as *const i32;
        // SAFETY: `base` owns at least `need` contiguous i32s and outlives the view (it is
        // the view's base object); the buffer is only written again once no view is left.
        let view = unsafe {
            let shape = ArrayView2::from_shape_ptr((rows, cols), ptr);
            let arr = PyArray2::borrow_from_array(&shape, base.into_any());
            arr.readwrite().make_nonwriteable();
            arr
        };
        Ok((view, stamp))
    }
}

/// The KV-cache manager and scheduler.
#[pyclass(module = "kvserve._core", name = "Core")]
pub struct PyCore {
    pub(crate) inner: Scheduler,
    tables: PlanTables,
}

#[pymethods]
impl PyCore {
    #[new]
    #[pyo3(signature = (
        num_gpu_blocks, block_size = 16, num_host_blocks = 0, max_num_seqs = 256,
        max_num_batched_tokens = 2048, max_model_len = 4096, max_waiting = 4096,
        enable_prefix_caching = true, preemption_mode = "auto", watermark = 0.01,
        kv_bytes_per_token = 0, flops_per_token = 0.0, swap_bytes_per_s = 25e9,
        prefill_flops_per_s = 1e14))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_gpu_blocks: i64,
        block_size: i64,
        num_host_blocks: i64,
        max_num_seqs: i64,
        max_num_batched_tokens: i64,
        max_model_len: i64,
        max_waiting: i64,
        enable_prefix_caching: bool,
        preemption_mode: &str,
        watermark: f64,
        kv_bytes_per_token: i64,
        flops_per_token: f64,
        swap_bytes_per_s: f64,
        prefill_flops_per_s: f64,
    ) -> PyResult<Self> {
        let cfg = Config {
            num_gpu_blocks: nonneg(num_gpu_blocks, "num_gpu_blocks", config_err)?,
            block_size: nonneg(block_size, "block_size", config_err)?,
            num_host_blocks: nonneg(num_host_blocks, "num_host_blocks", config_err)?,
            max_num_seqs: nonneg(max_num_seqs, "max_num_seqs", config_err)?,
            max_num_batched_tokens: nonneg(
                max_num_batched_tokens,
                "max_num_batched_tokens",
                config_err,
            )?,
            max_model_len: nonneg(max_model_len, "max_model_len", config_err)?,
            max_waiting: nonneg(max_waiting, "max_waiting", config_err)?,
            enable_prefix_caching,
            preemption_mode: PreemptionMode::parse(preemption_mode).map_err(to_py)?,
            watermark,
            kv_bytes_per_token: nonneg(kv_bytes_per_token, "kv_bytes_per_token", config_err)?
                as u64,
            flops_per_token,
            swap_bytes_per_s,
            prefill_flops_per_s,
        };
        Ok(PyCore {
            inner: Scheduler::new(cfg).map_err(to_py)?,
            tables: PlanTables::default(),
        })
    }

    /// Queues a request and returns its handle.
    #[pyo3(signature = (
        request_id, prompt_token_ids, max_tokens, min_tokens = 0, stop_token_ids = None,
        eos_token_id = None, ignore_eos = false, priority = 0, cache_salt = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &mut self,
        request_id: String,
        prompt_token_ids: &Bound<'_, PyAny>,
        max_tokens: i64,
        min_tokens: i64,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
        eos_token_id: Option<i64>,
        ignore_eos: bool,
        priority: i64,
        cache_salt: Option<String>,
    ) -> PyResult<u64> {
        let stop = match stop_token_ids {
            Some(s) => extract_tokens(s, "stop_token_ids")?,
            None => Vec::new(),
        };
        let params = RequestParams {
            request_id,
            prompt_token_ids: extract_tokens(prompt_token_ids, "prompt_token_ids")?,
            max_tokens: nonneg(max_tokens, "max_tokens", request_err)?,
            min_tokens: nonneg(min_tokens, "min_tokens", request_err)?,
            stop_token_ids: stop,
            eos_token_id,
            ignore_eos,
            priority,
            cache_salt,
        };
        self.inner.add_request(params).map_err(to_py)
    }

    /// Plans the next step.
    fn schedule(&mut self, py: Python<'_>) -> PyResult<PyPlan> {
        let plan = self.inner.schedule().map_err(to_py)?;
        let table = self
            .tables
            .view(py, &self.inner, plan.num_seqs, plan.max_blocks)?;
        PyPlan::from_plan(py, plan, table)
    }

    /// Appends one sampled token per row of `plan.sample_handles`.
    fn commit(
        &mut self,
        py: Python<'_>,
        plan_id: u64,
        sampled_token_ids: &Bound<'_, PyAny>,
    ) -> PyResult<PyStepOutput> {
        // A contiguous int64 array is read in place (the runner's usual input); anything
        // else is converted first.
        if let Ok(arr) = sampled_token_ids.cast::<PyArray1<i64>>() {
            let ro = arr.readonly();
            if let Ok(tokens) = ro.as_slice() {
                let out = self.inner.commit(plan_id, tokens).map_err(to_py)?;
                return Ok(PyStepOutput::from_output(py, out));
            }
        }
        let tokens = extract_tokens(sampled_token_ids, "sampled_token_ids")?;
        let out = self.inner.commit(plan_id, &tokens).map_err(to_py)?;
        Ok(PyStepOutput::from_output(py, out))
    }

    /// Ends a live request for a reason found in Python (e.g. a stop string).
    fn finish(&mut self, request_id: &str, reason: &str) -> bool {
        self.inner.finish(request_id, reason)
    }

    /// Frees everything a request holds; False for an unknown id.
    fn abort(&mut self, request_id: &str) -> bool {
        self.inner.abort(request_id)
    }

    fn has_unfinished(&self) -> bool {
        self.inner.has_unfinished()
    }

    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.metrics() {
            match v {
                MetricValue::Int(i) => d.set_item(k, i)?,
                MetricValue::Float(f) => d.set_item(k, f)?,
            }
        }
        Ok(d)
    }

    /// Stats of a live or recently finished request; KeyError if unknown.
    fn request_stats<'py>(
        &self,
        py: Python<'py>,
        request_id: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.request_stats(request_id).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("handle", s.handle)?;
        d.set_item("prompt_tokens", s.prompt_tokens)?;
        d.set_item("output_tokens", s.output_tokens)?;
        d.set_item("cached_prompt_tokens", s.cached_prompt_tokens)?;
        d.set_item("num_computed_tokens", s.num_computed_tokens)?;
        d.set_item("num_preemptions", s.num_preemptions)?;
        d.set_item("state", s.state)?;
        Ok(d)
    }

    /// Raises RuntimeError naming the first broken invariant.
    fn check_invariants(&self) -> PyResult<()> {
        self.inner.check_invariants().map_err(to_py)
    }

    #[getter]
    fn num_gpu_blocks(&self) -> usize {
        self.inner.gpu_pool().num_blocks()
    }
    #[getter]
    fn num_free_gpu_blocks(&self) -> usize {
        self.inner.gpu_pool().num_free()
    }
    #[getter]
    fn num_cached_gpu_blocks(&self) -> usize {
        self.inner.gpu_pool().num_cached()
    }
    #[getter]
    fn num_used_gpu_blocks(&self) -> usize {
        self.inner.gpu_pool().num_used()
    }
    #[getter]
    fn num_host_blocks(&self) -> usize {
        self.inner.host_pool().num_blocks()
    }
    #[getter]
    fn num_used_host_blocks(&self) -> usize {
        self.inner.host_pool().num_used()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.config().block_size
    }
    #[getter]
    fn max_model_len(&self) -> usize {
        self.inner.config().max_model_len
    }
    #[getter]
    fn max_num_seqs(&self) -> usize {
        self.inner.config().max_num_seqs
    }
    #[getter]
    fn max_num_batched_tokens(&self) -> usize {
        self.inner.config().max_num_batched_tokens
    }
    #[getter]
    fn num_running(&self) -> usize {
        self.inner.num_running()
    }
    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.num_waiting()
    }
    #[getter]
    fn num_swapped(&self) -> usize {
        self.inner.num_swapped()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Core(num_gpu_blocks={}, block_size={}, running={}, waiting={}, swapped={})",
            c.num_gpu_blocks,
            c.block_size,
            self.inner.num_running(),
            self.inner.num_waiting(),
            self.inner.num_swapped()
        )
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyCore>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyStepOutput>()?;
    crate::python_router::register(m)?;
    m.add("InvalidRequestError", py.get_type::<InvalidRequestError>())?;
    m.add(
        "RequestTooLargeError",
        py.get_type::<RequestTooLargeError>(),
    )?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("AtCapacityError", py.get_type::<AtCapacityError>())?;
    m.add("StalePlanError", py.get_type::<StalePlanError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
