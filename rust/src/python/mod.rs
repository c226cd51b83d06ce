//! PyO3 bindings: `kvserve._core`. The only place core errors become Python exceptions
//! (`errors`). `Core` wraps the scheduler (`core`); plans and step outputs hand their Vecs
//! to numpy without copying (`outputs`); a plan's block table is a read-only view of a
//! recycled buffer (`plan_tables`).

mod convert;
mod core;
mod errors;
mod outputs;
mod plan_tables;
mod router;

use pyo3::prelude::*;

use self::core::PyCore;
use errors::{
    AtCapacityError, ConfigError, InvalidRequestError, RequestTooLargeError, StalePlanError,
};
use outputs::{PyPlan, PyStepOutput};

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyCore>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyStepOutput>()?;
    router::register(m)?;
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
