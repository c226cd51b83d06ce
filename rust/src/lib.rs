//! kvserve's core: the paged KV block pool, the prefix cache and the continuous-batching
//! scheduler. Pure Rust; the Python binding (`kvserve._core`) lives in `python/` behind
//! the "python" feature.

mod batch_table;
pub mod block_pool;
pub mod config;
pub mod error;
pub mod kv_events;
pub mod metrics;
pub mod plan;
pub mod prefix_cache;
pub mod prefix_index;
mod recent_tokens;
pub mod request;
pub mod scheduler;

#[cfg(feature = "python")]
mod python;

pub use config::{Config, PreemptionMode};
pub use error::{CoreError, CoreResult};
pub use plan::{Plan, StepOutput};
pub use request::RequestParams;
pub use scheduler::{Ended, RequestStats, Scheduler};
