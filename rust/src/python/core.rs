//! `Core`: thin wrappers over `Scheduler`; arguments converted, errors mapped, results
//! wrapped, nothing decided here.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::{Config, PreemptionMode};
use crate::metrics::MetricValue;
use crate::request::RequestParams;
use crate::scheduler::Scheduler;

use super::convert::{extract_tokens, nonneg};
use super::errors::{config_err, request_err, to_py};
use super::outputs::{PyPlan, PyStepOutput};
use super::plan_tables::PlanTables;

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
        prefill_flops_per_s = 1e14, finished_memory = 4096, evicted_memory = None,
        host_prefix_cache = false, load_bytes_per_s = 25e9))]
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
        finished_memory: i64,
        evicted_memory: Option<i64>,
        host_prefix_cache: bool,
        load_bytes_per_s: f64,
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
            finished_memory: nonneg(finished_memory, "finished_memory", config_err)?,
            evicted_memory: evicted_memory
                .map(|m| nonneg(m, "evicted_memory", config_err))
                .transpose()?,
            host_prefix_cache,
            load_bytes_per_s,
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

    /// (steps, grows_at): how many steps (at most `max_steps`) the steady decode batch can
    /// run, `token` sampled for every row, before one may stop a request or lacks a block
    /// (0: the next step is not a steady one); the step (1-based) each block they take is
    /// taken at, in order.
    fn steady_outlook<'py>(
        &self,
        py: Python<'py>,
        token: i64,
        max_steps: usize,
    ) -> (usize, Bound<'py, PyArray1<i64>>) {
        let o = self.inner.steady_outlook(token, max_steps);
        let grows: Vec<i64> = o.grows_at.iter().map(|&j| j as i64).collect();
        (o.steps, PyArray1::from_vec(py, grows))
    }

    /// Runs up to `max_steps` of those steps (each a schedule + commit of `token` for every
    /// row) and returns how many ran; no plan is pending afterwards.
    fn run_steady(&mut self, max_steps: usize, token: i64) -> usize {
        self.inner.run_steady(max_steps, token)
    }

    /// Ends a live request for a reason found in Python (e.g. a stop string); the prompt
    /// tokens it had served from the prefix cache, or None for an id that is not live.
    fn finish(&mut self, request_id: &str, reason: &str) -> Option<usize> {
        self.inner
            .finish(request_id, reason)
            .map(|e| e.cached_prompt_tokens)
    }

    /// Frees everything a request holds; its handle, or None for an id that is not live.
    fn abort(&mut self, request_id: &str) -> Option<u64> {
        self.inner.abort(request_id).map(|e| e.handle)
    }

    /// The runner could not complete plan `plan_id`'s host-tier copies: ends the requests
    /// that needed its loads (their ids are returned) and drops what its offloads wrote.
    /// The plan still needs its commit.
    fn fail_copies(&mut self, plan_id: u64) -> PyResult<Vec<String>> {
        self.inner.fail_copies(plan_id).map_err(to_py)
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

    /// The sizes of the core's records, by kind (bounded by live requests or the config).
    fn retained<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.inner.retained();
        let d = PyDict::new(py);
        for (k, v) in [
            ("slots", r.slots),
            ("live_ids", r.live_ids),
            ("finished", r.finished),
            ("finished_order", r.finished_order),
            ("evicted", r.evicted),
            ("evicted_fifo", r.evicted_fifo),
            ("kv_events", r.kv_events),
            ("cached_digests", r.cached_digests),
        ] {
            d.set_item(k, v)?;
        }
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
    fn num_cached_host_blocks(&self) -> usize {
        self.inner.num_host_cached_blocks()
    }
    #[getter]
    fn host_prefix_cache(&self) -> bool {
        self.inner.config().host_prefix_cache
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
