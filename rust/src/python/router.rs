//! PyO3 bindings for routing: the core's block-hash chain, the prefix cache's KV event
//! log (as `Core` methods) and the router's `PrefixIndex`. Hashes cross the binding as
//! bytes, 16 little-endian bytes per u128 digest, so they go to and from protobuf as is.

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::core::PyCore;
use crate::prefix_cache::block_hashes;
use crate::prefix_index::{IndexError, PrefixIndex, Tier};

fn index_err(e: IndexError) -> PyErr {
    match e {
        IndexError::UnknownReplica(_) => PyKeyError::new_err(e.to_string()),
        IndexError::TooManyReplicas => PyValueError::new_err(e.to_string()),
    }
}

fn hashes_to_bytes<'py>(py: Python<'py>, hashes: &[u128]) -> Bound<'py, PyBytes> {
    PyBytes::new_with(py, hashes.len() * 16, |buf| {
        for (dst, h) in buf.chunks_exact_mut(16).zip(hashes) {
            dst.copy_from_slice(&h.to_le_bytes());
        }
        Ok(())
    })
    .unwrap_or_else(|_| PyBytes::new(py, &[]))
}

fn bytes_to_hashes(b: &[u8], field: &str) -> PyResult<Vec<u128>> {
    if b.len() % 16 != 0 {
        return Err(PyValueError::new_err(format!(
            "{field}: {} bytes is not a whole number of 16-byte block hashes",
            b.len()
        )));
    }
    Ok(b.chunks_exact(16)
        .map(|c| {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            u128::from_le_bytes(a)
        })
        .collect())
}

fn check_block_size(block_size: i64) -> PyResult<usize> {
    match usize::try_from(block_size) {
        Ok(b) if b > 0 => Ok(b),
        _ => Err(PyValueError::new_err(format!(
            "block_size: must be positive, got {block_size}"
        ))),
    }
}

/// Digests of every full block of `token_ids` (16 bytes each), as the prefix cache keys
/// them under `cache_salt`.
#[pyfunction(name = "block_hashes")]
#[pyo3(signature = (token_ids, block_size, cache_salt = None))]
fn py_block_hashes<'py>(
    py: Python<'py>,
    token_ids: Vec<i64>,
    block_size: i64,
    cache_salt: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    let bs = check_block_size(block_size)?;
    Ok(hashes_to_bytes(
        py,
        &block_hashes(&token_ids, bs, cache_salt),
    ))
}

#[pymethods]
impl PyCore {
    /// Records prefix-cache stored/evicted events in a log of at most `capacity` events
    /// (0 turns it off). Past the capacity the log drops its events and the next drain
    /// says "resync needed".
    fn enable_kv_events(&mut self, capacity: i64) -> PyResult<()> {
        let cap = usize::try_from(capacity)
            .map_err(|_| PyValueError::new_err(format!("capacity: {capacity} must be >= 0")))?;
        self.inner.prefix_cache_mut().set_event_capacity(cap);
        Ok(())
    }

    /// (resync_needed, first_seq, kinds, hashes): kinds one byte per event (1 stored,
    /// 2 evicted from the GPU, 3 stored on the host tier, 4 evicted from it), hashes 16
    /// bytes per event; event i has sequence number first_seq + i.
    fn drain_kv_events<'py>(
        &mut self,
        py: Python<'py>,
    ) -> (bool, u64, Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
        let b = self.inner.prefix_cache_mut().drain_events();
        let kinds: Vec<u8> = b.kinds.iter().map(|k| *k as u8).collect();
        (
            b.resync_needed,
            b.first_seq,
            PyBytes::new(py, &kinds),
            hashes_to_bytes(py, &b.hashes),
        )
    }

    /// (seq, hashes, host_hashes): every block hash cached now on the GPU and on the host
    /// tier, as of event `seq`: drained events with a sequence number up to `seq` are
    /// already in it.
    fn kv_snapshot<'py>(
        &mut self,
        py: Python<'py>,
    ) -> (u64, Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
        let (seq, gpu, host) = self.inner.kv_snapshot();
        (seq, hashes_to_bytes(py, &gpu), hashes_to_bytes(py, &host))
    }

    /// Tokens waiting requests still have to prefill.
    fn waiting_prompt_tokens(&self) -> usize {
        self.inner.waiting_prompt_tokens()
    }
}

/// The router's global prefix index: block hash -> replicas holding it.
#[pyclass(module = "kvserve._core", name = "PrefixIndex")]
struct PyPrefixIndex {
    inner: PrefixIndex,
}

#[pymethods]
impl PyPrefixIndex {
    #[new]
    #[pyo3(signature = (max_blocks_per_replica = 1 << 22))]
    fn new(max_blocks_per_replica: i64) -> PyResult<Self> {
        let cap = usize::try_from(max_blocks_per_replica).map_err(|_| {
            PyValueError::new_err(format!(
                "max_blocks_per_replica: {max_blocks_per_replica} must be >= 0"
            ))
        })?;
        Ok(PyPrefixIndex {
            inner: PrefixIndex::new(cap),
        })
    }

    fn add_replica(&mut self, name: &str) -> PyResult<usize> {
        self.inner.add_replica(name).map_err(index_err)
    }

    fn remove_replica(&mut self, name: &str) -> bool {
        self.inner.remove_replica(name)
    }

    fn clear_replica(&mut self, name: &str) -> PyResult<()> {
        self.inner.clear_replica(name).map_err(index_err)
    }

    /// Records that `name` caches `hashes` (16 bytes each); returns how many were new.
    fn store(&mut self, name: &str, hashes: &[u8]) -> PyResult<usize> {
        let hs = bytes_to_hashes(hashes, "hashes")?;
        self.inner.store(name, &hs).map_err(index_err)
    }

    fn evict(&mut self, name: &str, hashes: &[u8]) -> PyResult<usize> {
        let hs = bytes_to_hashes(hashes, "hashes")?;
        self.inner.evict(name, &hs).map_err(index_err)
    }

    /// Records that `name`'s host tier holds `hashes`; returns how many were new there.
    fn store_host(&mut self, name: &str, hashes: &[u8]) -> PyResult<usize> {
        let hs = bytes_to_hashes(hashes, "hashes")?;
        self.inner
            .store_in(Tier::Host, name, &hs)
            .map_err(index_err)
    }

    fn evict_host(&mut self, name: &str, hashes: &[u8]) -> PyResult<usize> {
        let hs = bytes_to_hashes(hashes, "hashes")?;
        self.inner
            .evict_from(Tier::Host, name, &hs)
            .map_err(index_err)
    }

    /// Like match_prompt, by tier: {replica: (leading blocks on its GPU, leading blocks
    /// in either tier)}, plus the number of full blocks of the prompt.
    #[pyo3(signature = (token_ids, block_size, cache_salt = None))]
    fn match_prompt_tiers<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        block_size: i64,
        cache_salt: Option<&str>,
    ) -> PyResult<(Bound<'py, PyDict>, usize)> {
        let bs = check_block_size(block_size)?;
        let hs = block_hashes(&token_ids, bs, cache_salt);
        let d = PyDict::new(py);
        for (name, gpu, any) in self.inner.longest_prefixes_by_tier(&hs) {
            d.set_item(name, (gpu, any))?;
        }
        Ok((d, hs.len()))
    }

    /// Host-tier blocks indexed for `name`.
    fn host_blocks(&self, name: &str) -> PyResult<usize> {
        self.inner.replica_host_blocks(name).map_err(index_err)
    }

    /// {replica: leading blocks of the chain it holds} for every replica.
    fn longest_prefixes<'py>(
        &self,
        py: Python<'py>,
        hashes: &[u8],
    ) -> PyResult<Bound<'py, PyDict>> {
        let hs = bytes_to_hashes(hashes, "hashes")?;
        let d = PyDict::new(py);
        for (name, depth) in self.inner.longest_prefixes(&hs) {
            d.set_item(name, depth)?;
        }
        Ok(d)
    }

    /// Hashes `token_ids` with the core's chain and looks them up: {replica: cached
    /// leading blocks}, plus the number of full blocks of the prompt.
    #[pyo3(signature = (token_ids, block_size, cache_salt = None))]
    fn match_prompt<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        block_size: i64,
        cache_salt: Option<&str>,
    ) -> PyResult<(Bound<'py, PyDict>, usize)> {
        let bs = check_block_size(block_size)?;
        let hs = block_hashes(&token_ids, bs, cache_salt);
        let d = PyDict::new(py);
        for (name, depth) in self.inner.longest_prefixes(&hs) {
            d.set_item(name, depth)?;
        }
        Ok((d, hs.len()))
    }

    fn holds(&self, name: &str, hash: &[u8]) -> PyResult<bool> {
        let hs = bytes_to_hashes(hash, "hash")?;
        Ok(hs.len() == 1 && self.inner.holds(name, hs[0]))
    }

    /// (blocks indexed, stores dropped at the per-replica cap).
    fn replica_stats(&self, name: &str) -> PyResult<(usize, u64)> {
        self.inner.replica_stats(name).map_err(index_err)
    }

    fn replicas(&self) -> Vec<String> {
        self.inner
            .replicas()
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_block_hashes, m)?)?;
    m.add_class::<PyPrefixIndex>()?;
    Ok(())
}
