//! The Python exceptions of `kvserve._core`, and the one mapping from core errors to them.

use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

use crate::error::CoreError;

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

/// The Python exception for a core error (the message is the error's Display text).
pub(super) fn to_py(e: CoreError) -> PyErr {
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

/// A bad `Core(...)` argument found while converting it.
pub(super) fn config_err(m: String) -> PyErr {
    ConfigError::new_err(format!("invalid config: {m}"))
}

/// A bad request argument found while converting it (`m` starts with the field).
pub(super) fn request_err(m: String) -> PyErr {
    InvalidRequestError::new_err(m)
}
