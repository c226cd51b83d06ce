//! The recycled numpy buffers behind plans' block tables.

use numpy::ndarray::ArrayView2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::scheduler::Scheduler;

use super::errors::to_py;

/// Recycled memory for plans' block tables. The table is the plan's biggest array
/// (num_seqs x max_blocks) and changes by a few rows per step, so instead of a fresh
/// array per plan each buffer is brought up to date from the rows written since it was
/// last synced. A buffer is reused only when Python holds no view of it (its reference
/// count is ours alone); plans get read-only views, so their contents never change under
/// a caller and the buffer never drifts from what the core synced into it.
#[derive(Default)]
pub(super) struct PlanTables {
    bufs: Vec<PlanTable>,
}

/// One recycled buffer.
struct PlanTable {
    /// 1-D int32 buffer the views are made over.
    buf: Py<PyArray1<i32>>,
    /// The stamp it was last synced at (None: contents unknown).
    synced_at: Option<u64>,
}

/// True when the pool's reference is the only one (no plan or view holds the buffer).
fn only_ours(b: &Py<PyArray1<i32>>) -> bool {
    // SAFETY: reading the reference count of a live object while holding the GIL.
    unsafe { ffi::Py_REFCNT(b.as_ptr()) == 1 }
}

/// More buffers than this means a caller keeps many plans alive; extra ones are not kept.
const MAX_PLAN_TABLES: usize = 8;

impl PlanTables {
    pub(super) fn view<'py>(
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
            .filter(|(_, t)| {
                only_ours(&t.buf) && PyUntypedArrayMethods::len(t.buf.bind(py)) >= need
            })
            .max_by_key(|(_, t)| t.synced_at.map_or(0, |s| s + 1))
            .map(|(i, _)| i);
        let i = match free {
            Some(i) => i,
            None => {
                // Headroom so a table that grows by a row or a column keeps its buffer.
                let cap = (need + need / 4).max(256);
                let table = PlanTable {
                    buf: vec![-1i32; cap].into_pyarray(py).unbind(),
                    synced_at: None,
                };
                let spare = self.bufs.iter().position(|t| only_ours(&t.buf));
                match spare {
                    Some(j) => {
                        self.bufs[j] = table;
                        j
                    }
                    None if self.bufs.len() < MAX_PLAN_TABLES => {
                        self.bufs.push(table);
                        self.bufs.len() - 1
                    }
                    // Not pooled: filled whole, dropped with its plan.
                    None => {
                        return Self::fill(py, core, table.buf, None, rows, cols).map(|(v, _)| v)
                    }
                }
            }
        };
        let table = &mut self.bufs[i];
        let (view, stamp) = Self::fill(
            py,
            core,
            table.buf.clone_ref(py),
            table.synced_at,
            rows,
            cols,
        )?;
        table.synced_at = Some(stamp);
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
