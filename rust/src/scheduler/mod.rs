//! The continuous-batching scheduler: admission, per-step token budget, chunked prefill,
//! prefix reuse, preemption (recompute or swap), and commit with stop conditions.
//!
//! State moves only in `schedule` (blocks, queues, swaps) and `commit` (computed tokens,
//! appended tokens, finished requests). Every error is returned before anything changes.
//!
//! This file holds the state and the phases of `schedule`; each step of a request's way
//! through the core lives in a file of its own: `admission` (add_request, swap-in,
//! admitting waiting requests), `preemption` (growing, picking and preempting victims),
//! `plan_builder` (the plan from the scheduled rows), `steady` (the decode-batch fast
//! path; `steady_run` runs many of its steps in one call), `commit`, `lifecycle` (finish,
//! abort, request_stats) with `finished_log`, and
//! `invariants` (whole-core checks for tests).

mod admission;
mod commit;
mod finished_log;
mod host_tier;
mod invariants;
mod lifecycle;
mod load;
mod plan_builder;
mod preemption;
mod steady;
mod steady_run;

use std::collections::{BTreeSet, HashMap};

use crate::batch_table::BatchTable;
use crate::block_pool::BlockPool;
use crate::config::Config;
use crate::error::{CoreError, CoreResult};
use crate::metrics::{self, Counters, QueueLengths, Snapshot};
use crate::plan::{Plan, StepOutput};
use crate::prefix_cache::PrefixCache;
use crate::recent_tokens::RecentTokens;
use crate::request::{Request, Status};

use finished_log::FinishedLog;
use host_tier::HostTier;
pub use lifecycle::{Ended, RequestStats, Retained};
use plan_builder::{DecodePlanShape, Pending, PlannedRow, SampleRow, Scheduled};
use steady::SteadyBatch;
pub use steady_run::SteadyOutlook;

/// A waiting or swapped request's place in its queue; lower sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: i64,
    arrival: u64,
    slot: usize,
}

/// Per-step working Vecs, kept between steps so their capacity is reused (allocating and
/// freeing a few hundred KiB per step made glibc return memory to the kernel and fault it
/// back in).
#[derive(Debug, Default)]
struct Scratch {
    order: Vec<usize>,
    chunks: Vec<usize>,
    sched: Vec<Scheduled>,
    ordered: Vec<Scheduled>,
    seqs: Vec<PlannedRow>,
    samples: Vec<SampleRow>,
    /// A used plan and step output handed back (`recycle_plan`, `recycle_output`): their
    /// Vecs are refilled, so a step allocates nothing and touches no fresh pages.
    plan: Option<Plan>,
    output: Option<StepOutput>,
}

/// The KV-cache manager and scheduler: block pools, prefix cache, request records (by
/// slot) and their queues.
#[derive(Debug)]
pub struct Scheduler {
    cfg: Config,
    gpu: BlockPool,
    host: BlockPool,
    prefix: PrefixCache,
    /// The host prefix tier (see host_tier.rs); its blocks are `host`'s.
    host_tier: HostTier,
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    by_id: HashMap<String, usize>,
    running: Vec<usize>,
    waiting: BTreeSet<QueueKey>,
    swapped: BTreeSet<QueueKey>,
    next_handle: u64,
    next_arrival: u64,
    next_plan_id: u64,
    pending: Option<Pending>,
    counters: Counters,
    finished: FinishedLog,
    evicted_scratch: Vec<u128>,
    /// The last plan's block table, updated in place by the next plan.
    batch: BatchTable,
    /// Each request's latest output tokens, by slot.
    recent: RecentTokens,
    scratch: Scratch,
    steady: SteadyBatch,
    /// The last plan, if it was decode-only (`Plan::continues_plan_id` compares with it).
    last_decode_plan: Option<DecodePlanShape>,
    /// Whether `schedule` may take the steady-batch path (on; tests compare both ways).
    steady_path: bool,
}

/// The queue key of the request in `slot`.
fn key(r: &Request, slot: usize) -> QueueKey {
    QueueKey {
        priority: r.cold.priority,
        arrival: r.cold.arrival,
        slot,
    }
}

impl Scheduler {
    pub fn new(cfg: Config) -> CoreResult<Self> {
        cfg.validate()?;
        let mut gpu = BlockPool::new("gpu", cfg.num_gpu_blocks);
        if cfg.host_prefix_cache {
            gpu.track_lru_entries();
        }
        Ok(Scheduler {
            gpu,
            host_tier: HostTier::new(cfg.host_prefix_cache),
            host: BlockPool::new("host", cfg.num_host_blocks),
            prefix: PrefixCache::new(cfg.num_gpu_blocks, cfg.evicted_capacity()),
            finished: FinishedLog::new(cfg.finished_memory),
            cfg,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashMap::new(),
            running: Vec::new(),
            waiting: BTreeSet::new(),
            swapped: BTreeSet::new(),
            next_handle: 0,
            next_arrival: 0,
            next_plan_id: 0,
            pending: None,
            counters: Counters::default(),
            evicted_scratch: Vec::new(),
            batch: BatchTable::default(),
            recent: RecentTokens::default(),
            scratch: Scratch::default(),
            steady: SteadyBatch {
                plan_id: u64::MAX,
                ..SteadyBatch::default()
            },
            last_decode_plan: None,
            steady_path: true,
        })
    }

    /// Turns the steady-batch shortcut of `schedule` on or off (on by default). Plans are
    /// identical either way; tests and benchmarks compare the two.
    pub fn set_steady_path(&mut self, on: bool) {
        self.steady_path = on;
        self.steady.committed = false;
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The prefix cache, for its KV event log and snapshot.
    pub fn prefix_cache_mut(&mut self) -> &mut PrefixCache {
        &mut self.prefix
    }
    pub fn gpu_pool(&self) -> &BlockPool {
        &self.gpu
    }
    pub fn host_pool(&self) -> &BlockPool {
        &self.host
    }
    /// Blocks the host prefix tier holds (cached, findable by hash).
    pub fn num_host_cached_blocks(&self) -> usize {
        self.host_tier.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_swapped(&self) -> usize {
        self.swapped.len()
    }
    pub fn has_unfinished(&self) -> bool {
        !self.by_id.is_empty()
    }
    pub fn pending_plan_id(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.plan_id)
    }
    /// The live request called `id`, if any.
    pub fn request(&self, id: &str) -> Option<&Request> {
        self.by_id.get(id).and_then(|&s| self.slots[s].as_ref())
    }

    /// A snapshot of gauges and counters (names are the metrics dict's keys).
    pub fn metrics(&self) -> Snapshot {
        let queues = QueueLengths {
            running: self.running.len(),
            waiting: self.waiting.len(),
            swapped: self.swapped.len(),
        };
        let block_bytes = (self.cfg.block_size as u64).saturating_mul(self.cfg.kv_bytes_per_token);
        metrics::snapshot(&self.counters, &self.gpu, &self.host, queues, block_bytes)
    }

    /// Builds the next step's plan. Fails if the previous plan (with sequences, or with
    /// host-tier copies) has not been committed.
    pub fn schedule(&mut self) -> CoreResult<Plan> {
        if let Some(p) = &self.pending {
            if !p.seqs.is_empty() || self.host_tier.in_flight() {
                return Err(CoreError::StalePlan {
                    msg: format!(
                        "plan {} has not been committed; commit it before scheduling again",
                        p.plan_id
                    ),
                });
            }
        }
        if let Some(p) = self.pending.take() {
            self.recycle(p);
        }
        if let Some(plan) = self.schedule_steady() {
            return Ok(plan);
        }
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut sched = std::mem::take(&mut self.scratch.sched);
        sched.clear();
        let mut swap_out: Vec<i64> = Vec::new();
        let mut swap_in: Vec<i64> = Vec::new();
        let mut copies: Vec<i64> = Vec::new();
        let mut loads: Vec<i64> = Vec::new();
        let mut preempted = false;

        // Phase 1: running sequences, decodes (one token left) before prefill chunks.
        // The running list is copied: preemption edits it while we walk it.
        let mut order = std::mem::take(&mut self.scratch.order);
        order.clone_from(&self.running);
        let mut chunks = std::mem::take(&mut self.scratch.chunks);
        chunks.clear();
        let mut in_chunk_pass = false;
        let mut i = 0;
        loop {
            let slot = if !in_chunk_pass {
                match order.get(i) {
                    Some(&s) => s,
                    None => {
                        in_chunk_pass = true;
                        i = 0;
                        continue;
                    }
                }
            } else {
                match chunks.get(i) {
                    Some(&s) => s,
                    None => break,
                }
            };
            i += 1;
            if budget == 0 {
                break;
            }
            let r = self.req(slot);
            // An earlier iteration may have preempted this one.
            if r.status != Status::Running {
                continue;
            }
            // Decodes (one token left) first; prefill chunks wait for the second pass.
            if !in_chunk_pass && r.num_uncomputed() != 1 {
                chunks.push(slot);
                continue;
            }
            let num_new = r.num_uncomputed().min(budget);
            let need = self
                .cfg
                .blocks_for(r.num_computed + num_new)
                .saturating_sub(r.blocks.len());
            let mut self_preempted = false;
            while self.gpu.num_available() < need {
                let victim = self.pick_victim();
                preempted = true;
                if let Some(i) = sched.iter().position(|x| x.slot == victim && !x.removed) {
                    sched[i].removed = true;
                    budget += sched[i].num_new;
                }
                self.preempt(victim, &mut swap_out);
                if victim == slot {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                continue;
            }
            if need > 0 {
                self.grow(slot, need);
            }
            sched.push(Scheduled::new(slot, self.req(slot), num_new));
            budget -= num_new;
        }

        // Blocks that went idle go to the host tier before admissions can evict them.
        let mut offloads: Vec<i64> = Vec::new();
        self.schedule_offloads(&mut offloads);

        // Phases 2 and 3 admit new work, which a step that had to preempt must not do.
        if !preempted {
            self.swap_in_phase(&mut budget, &mut sched, &mut swap_in);
            // Swapped requests hold host memory and were running: they come back first.
            if self.swapped.is_empty() {
                self.admit_phase(&mut budget, &mut sched, &mut copies, &mut loads);
            }
        }

        self.scratch.order = order;
        self.scratch.chunks = chunks;
        let copy_lists = plan_builder::CopyLists {
            swap_out,
            swap_in,
            copies,
            offloads,
            loads,
        };
        let plan = self.build_plan(sched, copy_lists);
        Ok(plan)
    }

    /// Keeps a finished plan's Vecs for the next step.
    fn recycle(&mut self, p: Pending) {
        self.scratch.seqs = p.seqs;
        self.scratch.samples = p.samples;
    }

    fn req(&self, slot: usize) -> &Request {
        // Slots in queues always hold a request; a hole here is a bug, not caller input.
        self.slots[slot]
            .as_ref()
            .expect("queued slot holds a request")
    }

    fn req_mut(&mut self, slot: usize) -> &mut Request {
        self.slots[slot]
            .as_mut()
            .expect("queued slot holds a request")
    }
}
