//! Counters and gauges of the core, exported as a flat snapshot: a function of the
//! counters, the block pools and the queue lengths.

use crate::block_pool::BlockPool;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricValue {
    Int(u64),
    Float(f64),
}

/// Monotonic counters; gauges are read from the pools and queues when a snapshot is taken.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub steps: u64,
    /// Steps planned from the steady decode batch (no request record visited).
    pub steps_steady: u64,
    pub prefix_queries_tokens: u64,
    pub prefix_hits_tokens: u64,
    pub preemptions_recompute: u64,
    pub preemptions_swap: u64,
    pub recomputed_tokens: u64,
    pub swapped_out_blocks: u64,
    pub swapped_in_blocks: u64,
    pub cow_copies: u64,
    pub tokens_scheduled_last_step: u64,
    pub seqs_scheduled_last_step: u64,
    pub tokens_scheduled_total: u64,
    pub requests_added: u64,
    pub requests_finished: u64,
    pub requests_aborted: u64,
    pub requests_rejected: u64,
    /// Prompt tokens served by each tier (their sum is `prefix_hits_tokens`).
    pub prefix_hits_gpu_tokens: u64,
    pub prefix_hits_host_tokens: u64,
    /// Host tier copies, by direction, counted when scheduled.
    pub host_offloaded_blocks: u64,
    pub host_loaded_blocks: u64,
    /// Admissions whose longest prefix reached the host tier: loaded, or recomputed
    /// because the cost model found that cheaper.
    pub host_load_decisions: u64,
    pub host_recompute_decisions: u64,
    /// Cached host blocks dropped to make room (for offloads or swaps).
    pub host_evictions: u64,
    /// Host tier copies reported failed (`fail_copies`), and requests ended by them.
    pub host_copy_failures: u64,
    pub host_copy_failed_requests: u64,
}

pub type Snapshot = Vec<(&'static str, MetricValue)>;

/// How many requests each queue holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLengths {
    pub running: usize,
    pub waiting: usize,
    pub swapped: usize,
}

/// A snapshot of gauges and counters (names are the metrics dict's keys).
pub fn snapshot(
    c: &Counters,
    gpu: &BlockPool,
    host: &BlockPool,
    queues: QueueLengths,
    block_bytes: u64,
) -> Snapshot {
    use MetricValue::{Float, Int};
    let frac = |used: usize, total: usize| {
        if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        }
    };
    let hit_rate = if c.prefix_queries_tokens == 0 {
        0.0
    } else {
        c.prefix_hits_tokens as f64 / c.prefix_queries_tokens as f64
    };
    vec![
        ("running", Int(queues.running as u64)),
        ("waiting", Int(queues.waiting as u64)),
        ("swapped", Int(queues.swapped as u64)),
        ("num_gpu_blocks", Int(gpu.num_blocks() as u64)),
        ("gpu_blocks_free", Int(gpu.num_free() as u64)),
        ("gpu_blocks_cached", Int(gpu.num_cached() as u64)),
        ("gpu_blocks_used", Int(gpu.num_used() as u64)),
        (
            "gpu_kv_usage",
            Float(frac(gpu.num_used(), gpu.num_blocks())),
        ),
        ("num_host_blocks", Int(host.num_blocks() as u64)),
        ("host_blocks_used", Int(host.num_used() as u64)),
        (
            "host_kv_usage",
            Float(frac(host.num_used(), host.num_blocks())),
        ),
        ("prefix_queries_tokens", Int(c.prefix_queries_tokens)),
        ("prefix_hits_tokens", Int(c.prefix_hits_tokens)),
        ("prefix_hit_rate", Float(hit_rate)),
        ("evictions", Int(gpu.evictions())),
        (
            "preemptions",
            Int(c.preemptions_recompute + c.preemptions_swap),
        ),
        ("preemptions_recompute", Int(c.preemptions_recompute)),
        ("preemptions_swap", Int(c.preemptions_swap)),
        ("recomputed_tokens", Int(c.recomputed_tokens)),
        ("swapped_out_blocks", Int(c.swapped_out_blocks)),
        ("swapped_in_blocks", Int(c.swapped_in_blocks)),
        ("cow_copies", Int(c.cow_copies)),
        (
            "tokens_scheduled_last_step",
            Int(c.tokens_scheduled_last_step),
        ),
        ("seqs_scheduled_last_step", Int(c.seqs_scheduled_last_step)),
        ("tokens_scheduled_total", Int(c.tokens_scheduled_total)),
        ("steps", Int(c.steps)),
        ("steps_steady", Int(c.steps_steady)),
        ("requests_added", Int(c.requests_added)),
        ("requests_finished", Int(c.requests_finished)),
        ("requests_aborted", Int(c.requests_aborted)),
        ("prefix_hits_gpu_tokens", Int(c.prefix_hits_gpu_tokens)),
        ("prefix_hits_host_tokens", Int(c.prefix_hits_host_tokens)),
        ("host_blocks_cached", Int(host.num_cached() as u64)),
        (
            "host_cache_usage",
            Float(frac(host.num_cached(), host.num_blocks())),
        ),
        ("host_offloaded_blocks", Int(c.host_offloaded_blocks)),
        ("host_loaded_blocks", Int(c.host_loaded_blocks)),
        (
            "host_offloaded_bytes",
            Int(c.host_offloaded_blocks.saturating_mul(block_bytes)),
        ),
        (
            "host_loaded_bytes",
            Int(c.host_loaded_blocks.saturating_mul(block_bytes)),
        ),
        ("host_load_decisions", Int(c.host_load_decisions)),
        ("host_recompute_decisions", Int(c.host_recompute_decisions)),
        ("host_evictions", Int(c.host_evictions)),
        ("host_copy_failures", Int(c.host_copy_failures)),
        (
            "host_copy_failed_requests",
            Int(c.host_copy_failed_requests),
        ),
    ]
}
