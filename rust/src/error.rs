//! Typed errors of the core. Every error is raised before any state changes, so the
//! caller may retry or drop the request and the core stays as it was.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A bad `Core(...)` argument; `field` names the argument.
    #[error("invalid config: {field}: {msg}")]
    Config { field: &'static str, msg: String },

    /// A bad request or commit field; `field` names it, first (callers match on it).
    #[error("{field}: {msg}")]
    InvalidRequest { field: &'static str, msg: String },

    /// A request that could not run even alone in an empty cache (its prompt plus
    /// `max_tokens` needs more GPU blocks than the pool has); `field` names the field to
    /// shrink. Rejected at admission so it can never be preempted forever. The text keeps
    /// "could never run" (the gRPC server matches it).
    #[error("{field}: {msg}")]
    RequestTooLarge { field: &'static str, msg: String },

    /// The waiting queue already holds `max_waiting` requests; nothing was queued.
    #[error("at capacity: {waiting} requests waiting (max_waiting={max_waiting}); retry later")]
    AtCapacity { waiting: usize, max_waiting: usize },

    /// `commit` named a plan that is not the latest uncommitted one, or `schedule` was
    /// called while the previous plan was still uncommitted.
    #[error("stale plan: {msg}")]
    StalePlan { msg: String },

    /// A block pool could not hand out the blocks asked for; nothing was allocated.
    #[error("out of blocks: {pool} pool asked for {requested}, {available} available")]
    OutOfBlocks {
        pool: &'static str,
        requested: usize,
        available: usize,
    },

    /// `request_stats` for an id the core does not know.
    #[error("unknown request id {0:?}")]
    UnknownRequest(String),

    /// A broken internal invariant (found by `check_invariants`).
    #[error("invariant broken: {0}")]
    Invariant(String),
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    /// Whether this is a bad-request error of either kind (`RequestTooLarge` is a
    /// special case of `InvalidRequest`, as its Python class is a subclass).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            CoreError::InvalidRequest { .. } | CoreError::RequestTooLarge { .. }
        )
    }
}

pub(crate) fn invalid(field: &'static str, msg: impl Into<String>) -> CoreError {
    CoreError::InvalidRequest {
        field,
        msg: msg.into(),
    }
}

pub(crate) fn config(field: &'static str, msg: impl Into<String>) -> CoreError {
    CoreError::Config {
        field,
        msg: msg.into(),
    }
}
