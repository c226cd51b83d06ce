//! The continuous-batching scheduler: admission, per-step token budget, chunked prefill,
//! prefix reuse, preemption (recompute or swap), and commit with stop conditions.
//!
//! State moves only in `schedule` (blocks, queues, swaps) and `commit` (computed tokens,
//! appended tokens, finished requests). Every error is returned before anything changes.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::batch_table::{BatchTable, RowKey};
use crate::block_pool::BlockPool;
use crate::config::{Config, PreemptionMode};
use crate::error::{invalid, CoreError, CoreResult};
use crate::metrics::Counters;
use crate::plan::{Plan, StepOutput};
use crate::prefix_cache::{extend_hashes, root_hash, PrefixCache};
use crate::recent_tokens::RecentTokens;
use crate::request::{Request, RequestParams, Status};

/// Queue key: (priority, arrival, slot); lower sorts first.
type QueueKey = (i64, u64, usize);

/// How many finished requests `request_stats` still remembers.
const FINISHED_MEMORY: usize = 4096;

/// One sequence scheduled in the current step, with the request fields the plan needs,
/// copied while the request's record is in cache: building the plan then streams through
/// these instead of visiting every record a second time. A scheduled request changes only
/// by being preempted later in the same step, which marks its entry `removed`.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    slot: usize,
    num_new: usize,
    /// Blocks the sequence holds for this step (its block-table row length).
    num_blocks: usize,
    handle: u64,
    /// Tokens computed before this step (the first new token's position).
    start: usize,
    /// Prompt plus output tokens (the context length once this step is done, if sampled).
    num_tokens: usize,
    last_token: i64,
    blocks_gen: u32,
    /// One new token that completes the context (sampled): a decode row.
    decode: bool,
    removed: bool,
}

impl Scheduled {
    fn new(slot: usize, r: &Request, num_new: usize) -> Self {
        let num_tokens = r.num_tokens();
        Scheduled {
            slot,
            num_new,
            num_blocks: r.blocks.len(),
            handle: r.handle,
            start: r.num_computed,
            num_tokens,
            last_token: r.last_token,
            blocks_gen: r.blocks_gen,
            decode: num_new == 1 && r.num_computed + 1 == num_tokens,
            removed: false,
        }
    }
}

/// The last plan, kept until it is committed.
#[derive(Debug, Default)]
struct Pending {
    plan_id: u64,
    seqs: Vec<(usize, u64, usize)>,
    samples: Vec<(usize, u64)>,
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
    seqs: Vec<(usize, u64, usize)>,
    samples: Vec<(usize, u64)>,
    /// A used plan and step output handed back (`recycle_plan`, `recycle_output`): their
    /// Vecs are refilled, so a step allocates nothing and touches no fresh pages.
    plan: Option<Plan>,
    output: Option<StepOutput>,
}

/// The last plan when it was decode-only, as dense columns, so that the next step, if
/// nothing but its commit happened in between, is planned from these alone: every row
/// advances one position and takes the token just sampled, and only a row that starts a
/// new block visits its request record (to grow). A steady decode batch then costs a few
/// sequential passes over small arrays instead of a visit to every request record.
#[derive(Debug, Default)]
struct SteadyBatch {
    /// The plan these columns describe (u64::MAX: none).
    plan_id: u64,
    /// That plan was committed with every row sampled and none finished, nothing else is
    /// running, waiting or swapped, and no request was added or ended since.
    committed: bool,
    handles: Vec<u64>,
    positions: Vec<i64>,
    slot_mapping: Vec<i64>,
    /// No request ended since that plan was made: all its rows still run.
    intact: bool,
    /// The tokens its commit sampled: the next step's input ids.
    tokens: Vec<i64>,
    /// Each row's stop conditions (fixed for a request's life), so commit reads its
    /// record only when a token may stop it.
    stops: Vec<StopRule>,
    /// Rows that need a new block this step (scratch).
    growing: Vec<usize>,
}

/// A request's stop conditions, copied from its record (see `Request::stop_reason`).
#[derive(Debug, Clone, Copy)]
struct StopRule {
    min_len: usize,
    length_limit: usize,
    stop_eos: i64,
    has_stop_ids: bool,
}

impl StopRule {
    fn of(r: &Request) -> Self {
        StopRule {
            min_len: r.min_len,
            length_limit: r.length_limit,
            stop_eos: r.stop_eos,
            has_stop_ids: r.has_stop_ids,
        }
    }

    /// False when `Request::stop_reason` surely returns None for a request holding
    /// `num_tokens` tokens, the newest `token`.
    #[inline]
    fn may_stop(&self, num_tokens: usize, token: i64) -> bool {
        num_tokens >= self.length_limit
            || (num_tokens >= self.min_len && (token == self.stop_eos || self.has_stop_ids))
    }
}

/// What `request_stats` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestStats {
    pub handle: u64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub num_computed_tokens: usize,
    pub num_preemptions: u32,
    pub state: String,
}

#[derive(Debug)]
pub struct Scheduler {
    pub(crate) cfg: Config,
    pub(crate) gpu: BlockPool,
    pub(crate) host: BlockPool,
    pub(crate) prefix: PrefixCache,
    pub(crate) slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    pub(crate) by_id: HashMap<String, usize>,
    pub(crate) running: Vec<usize>,
    pub(crate) waiting: BTreeSet<QueueKey>,
    pub(crate) swapped: BTreeSet<QueueKey>,
    next_handle: u64,
    next_arrival: u64,
    next_plan_id: u64,
    pending: Option<Pending>,
    pub(crate) counters: Counters,
    finished: HashMap<String, RequestStats>,
    finished_order: VecDeque<String>,
    evicted_scratch: Vec<u128>,
    /// The last plan's block table, updated in place by the next plan.
    batch: BatchTable,
    /// Each request's latest output tokens, by slot.
    pub(crate) recent: RecentTokens,
    scratch: Scratch,
    steady: SteadyBatch,
    /// Whether `schedule` may take the steady-batch path (on; tests compare both ways).
    steady_path: bool,
}

fn key(r: &Request, slot: usize) -> QueueKey {
    (r.cold.priority, r.cold.arrival, slot)
}

impl Scheduler {
    pub fn new(cfg: Config) -> CoreResult<Self> {
        cfg.validate()?;
        Ok(Scheduler {
            gpu: BlockPool::new("gpu", cfg.num_gpu_blocks),
            host: BlockPool::new("host", cfg.num_host_blocks),
            prefix: PrefixCache::new(
                cfg.num_gpu_blocks,
                cfg.num_gpu_blocks.saturating_mul(4).min(1 << 20),
            ),
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
            finished: HashMap::new(),
            finished_order: VecDeque::new(),
            evicted_scratch: Vec::new(),
            batch: BatchTable::default(),
            recent: RecentTokens::default(),
            scratch: Scratch::default(),
            steady: SteadyBatch {
                plan_id: u64::MAX,
                ..SteadyBatch::default()
            },
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
    pub fn gpu_pool(&self) -> &BlockPool {
        &self.gpu
    }
    /// The prefix cache, for its KV event log and snapshot.
    pub fn prefix_cache_mut(&mut self) -> &mut PrefixCache {
        &mut self.prefix
    }
    pub fn host_pool(&self) -> &BlockPool {
        &self.host
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

    // ---------------------------------------------------------------- admission

    /// Queues a request; returns its handle. Nothing changes on error.
    pub fn add_request(&mut self, p: RequestParams) -> CoreResult<u64> {
        let cfg = &self.cfg;
        if p.request_id.is_empty() {
            return Err(invalid("request_id", "must not be empty"));
        }
        if self.by_id.contains_key(&p.request_id) {
            return Err(invalid(
                "request_id",
                format!("{:?} is already a live request", p.request_id),
            ));
        }
        let n = p.prompt_token_ids.len();
        if n == 0 {
            return Err(invalid("prompt_token_ids", "must not be empty"));
        }
        if let Some(t) = p.prompt_token_ids.iter().find(|&&t| t < 0) {
            return Err(invalid(
                "prompt_token_ids",
                format!("token id {t} is negative"),
            ));
        }
        if n >= cfg.max_model_len {
            return Err(invalid(
                "prompt_token_ids",
                format!(
                    "prompt has {n} tokens; max_model_len is {}",
                    cfg.max_model_len
                ),
            ));
        }
        if p.max_tokens < 1 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if p.min_tokens > p.max_tokens {
            return Err(invalid(
                "min_tokens",
                format!("{} is more than max_tokens {}", p.min_tokens, p.max_tokens),
            ));
        }
        // The last token is sampled, never fed back, so it needs no KV slot.
        let max_total = n.saturating_add(p.max_tokens).min(cfg.max_model_len);
        let need = cfg.blocks_for(max_total - 1);
        if need > cfg.num_gpu_blocks {
            let field = if cfg.blocks_for(n) > cfg.num_gpu_blocks {
                "prompt_token_ids"
            } else {
                "max_tokens"
            };
            return Err(CoreError::RequestTooLarge {
                field,
                msg: format!(
                    "prompt ({n} tokens) plus max_tokens ({}) needs {need} blocks of {}; \
                     the GPU pool has only {}, so it could never run",
                    p.max_tokens, cfg.block_size, cfg.num_gpu_blocks
                ),
            });
        }
        if self.waiting.len() >= cfg.max_waiting {
            return Err(CoreError::AtCapacity {
                waiting: self.waiting.len(),
                max_waiting: cfg.max_waiting,
            });
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let root = root_hash(p.cache_salt.as_deref());
        let id = p.request_id.clone();
        let req = Request::new(p, handle, arrival, root, cfg.max_model_len);
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.waiting.insert(key(&req, slot));
        self.slots[slot] = Some(req);
        self.steady.committed = false;
        self.recent.ensure_slots(self.slots.len());
        self.by_id.insert(id, slot);
        self.counters.requests_added += 1;
        Ok(handle)
    }

    // ---------------------------------------------------------------- schedule

    /// Builds the next step's plan. Fails if the previous plan (with sequences) has not
    /// been committed.
    pub fn schedule(&mut self) -> CoreResult<Plan> {
        if let Some(p) = &self.pending {
            if !p.seqs.is_empty() {
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

        // Phases 2 and 3 admit new work, which a step that had to preempt must not do.
        if !preempted {
            self.swap_in_phase(&mut budget, &mut sched, &mut swap_in);
            // Swapped requests hold host memory and were running: they come back first.
            if self.swapped.is_empty() {
                self.admit_phase(&mut budget, &mut sched, &mut copies);
            }
        }

        self.scratch.order = order;
        self.scratch.chunks = chunks;
        let plan = self.build_plan(sched, swap_out, swap_in, copies);
        Ok(plan)
    }

    /// The next plan of a steady decode batch (see `SteadyBatch`), or None when the full
    /// path must run: something other than the last commit happened, or the rows that
    /// start a new block need more blocks than are free (the full path preempts).
    fn schedule_steady(&mut self) -> Option<Plan> {
        let n = self.steady.handles.len();
        if !(self.steady_path
            && self.steady.committed
            && self.waiting.is_empty()
            && self.swapped.is_empty()
            && self.running.len() == n
            && self.scratch.seqs.len() == n
            && self.scratch.samples.len() == n)
        {
            return None;
        }
        let shift = self.cfg.block_shift();
        let mask = (self.cfg.block_size - 1) as i64;
        let mut sb = std::mem::take(&mut self.steady);
        // A row's new token at position p needs block p >> shift; only a row whose p
        // starts a block can lack it (the last step covered position p - 1).
        sb.growing.clear();
        for (i, &p) in sb.positions.iter().enumerate() {
            let p = p + 1;
            if p & mask == 0 && (p >> shift) as usize >= self.batch.row_len(i) {
                sb.growing.push(i);
            }
        }
        if sb.growing.len() > self.gpu.num_available() {
            sb.committed = false;
            self.steady = sb;
            return None;
        }
        sb.committed = false;
        // The last plan's width (the table's), wider if a growing row outgrows it.
        let max_blocks = sb.growing.iter().fold(self.batch.stride(), |w, &i| {
            w.max(self.batch.row_len(i) + 1)
        });
        self.batch.begin(n, max_blocks, self.slots.len());
        for &i in &sb.growing {
            // Rows grow in row order, as the full path grows them: same blocks.
            let slot = self.scratch.seqs[i].0;
            self.grow(slot, 1);
            let r = self.slots[slot]
                .as_ref()
                .expect("steady row holds a request");
            let key = RowKey {
                handle: r.handle,
                blocks_gen: r.blocks_gen,
            };
            self.batch
                .set_row(i, slot, key, r.blocks.len(), || &r.blocks);
        }
        let batch = &self.batch;
        for (i, (p, sm)) in sb
            .positions
            .iter_mut()
            .zip(sb.slot_mapping.iter_mut())
            .enumerate()
        {
            *p += 1;
            *sm = if *p & mask != 0 {
                *sm + 1
            } else {
                i64::from(batch.block(i, (*p >> shift) as usize)) << shift
            };
        }
        self.batch.finish(n);

        let mut plan = self.scratch.plan.take().unwrap_or_default();
        plan.id = self.next_plan_id;
        self.next_plan_id += 1;
        plan.num_seqs = n;
        plan.num_tokens = n;
        plan.num_decodes = n;
        plan.max_blocks = max_blocks;
        for (dst, src) in [
            (&mut plan.handles, &sb.handles),
            (&mut plan.sample_handles, &sb.handles),
        ] {
            dst.clear();
            dst.extend_from_slice(src);
        }
        for (dst, src) in [
            (&mut plan.input_ids, &sb.tokens),
            (&mut plan.positions, &sb.positions),
            (&mut plan.slot_mapping, &sb.slot_mapping),
        ] {
            dst.clear();
            dst.extend_from_slice(src);
        }
        plan.query_start_loc.clear();
        plan.query_start_loc.extend(0..=n as i32);
        plan.seq_lens.clear();
        plan.seq_lens
            .extend(sb.positions.iter().map(|&p| (p + 1) as i32));
        plan.logits_indices.clear();
        plan.logits_indices.extend(0..n as i64);
        plan.swap_out.clear();
        plan.swap_in.clear();
        plan.copies.clear();
        // The last plan's rows, unchanged: (slot, handle, 1) and (slot, handle).
        self.pending = Some(Pending {
            plan_id: plan.id,
            seqs: std::mem::take(&mut self.scratch.seqs),
            samples: std::mem::take(&mut self.scratch.samples),
        });
        sb.plan_id = plan.id;
        sb.intact = true;
        self.steady = sb;
        self.counters.steps += 1;
        self.counters.steps_steady += 1;
        self.counters.tokens_scheduled_last_step = n as u64;
        self.counters.seqs_scheduled_last_step = n as u64;
        self.counters.tokens_scheduled_total += n as u64;
        Some(plan)
    }

    /// The latest plan's block table: row-major [num_seqs, max_blocks], padded with -1.
    /// Valid until the next `schedule`.
    pub fn block_table(&self) -> &[i32] {
        self.batch.as_slice()
    }

    /// Copies the latest plan's block table into `dst` (exactly num_seqs * max_blocks
    /// long) and returns the stamp of this copy. `since` is the stamp returned when `dst`
    /// was last synced (its contents untouched since), or None: then only the rows
    /// written after it are copied.
    pub fn sync_block_table(&self, dst: &mut [i32], since: Option<u64>) -> CoreResult<u64> {
        let want = self.batch.as_slice().len();
        if dst.len() != want {
            return Err(invalid(
                "dst",
                format!(
                    "block table buffer holds {} entries; the plan has {want}",
                    dst.len()
                ),
            ));
        }
        Ok(self.batch.sync_into(dst, since))
    }

    /// Hands a used plan back so the next `schedule` refills its Vecs instead of
    /// allocating (optional; the Python binding does it after copying the plan out).
    pub fn recycle_plan(&mut self, plan: Plan) {
        self.scratch.plan = Some(plan);
    }

    /// Hands a used step output back for the next `commit` to refill.
    pub fn recycle_output(&mut self, out: StepOutput) {
        self.scratch.output = Some(out);
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

    /// Allocates `n` more GPU blocks for a running request (caller checked availability).
    fn grow(&mut self, slot: usize, n: usize) {
        if n == 0 {
            return;
        }
        let mut new_blocks = Vec::with_capacity(n);
        let mut ev = std::mem::take(&mut self.evicted_scratch);
        let res = self.gpu.allocate(n, &mut new_blocks, &mut ev);
        debug_assert!(res.is_ok());
        for h in ev.drain(..) {
            self.prefix.on_evicted(h);
        }
        self.evicted_scratch = ev;
        self.req_mut(slot).blocks.extend_from_slice(&new_blocks);
    }

    /// The running request to preempt: lowest priority (largest value), latest arrival.
    fn pick_victim(&self) -> usize {
        let mut best = self.running[0];
        let mut best_key = self.req(best).order_key();
        for &s in &self.running[1..] {
            let k = self.req(s).order_key();
            if k > best_key {
                best = s;
                best_key = k;
            }
        }
        best
    }

    /// Swap when host blocks allow and (for auto) moving KV twice over PCIe is cheaper
    /// than recomputing it.
    fn choose_swap(&self, r: &Request) -> bool {
        let n = self.cfg.blocks_for(r.num_computed);
        if n == 0 || self.host.num_available() < n {
            return false;
        }
        match self.cfg.preemption_mode {
            PreemptionMode::Recompute => false,
            PreemptionMode::Swap => true,
            PreemptionMode::Auto => {
                let bytes = (n * self.cfg.block_size) as f64 * self.cfg.kv_bytes_per_token as f64;
                let swap_s = 2.0 * bytes / self.cfg.swap_bytes_per_s;
                let recompute_s =
                    r.num_computed as f64 * self.cfg.flops_per_token / self.cfg.prefill_flops_per_s;
                swap_s < recompute_s
            }
        }
    }

    fn preempt(&mut self, slot: usize, swap_out: &mut Vec<i64>) {
        let swap = self.choose_swap(self.req(slot));
        self.running.retain(|&s| s != slot);
        let mut r = self.slots[slot]
            .take()
            .expect("running slot holds a request");
        // Re-prefill (recompute) and later admission read the whole token list.
        self.recent.flush(&mut r, slot);
        r.cold.num_preemptions += 1;
        if swap {
            let n = self.cfg.blocks_for(r.num_computed);
            let mut host_blocks = Vec::with_capacity(n);
            let mut ev = Vec::new();
            let res = self.host.allocate(n, &mut host_blocks, &mut ev);
            debug_assert!(res.is_ok());
            for (g, h) in r.blocks.iter().zip(&host_blocks) {
                swap_out.push(i64::from(*g));
                swap_out.push(i64::from(*h));
            }
            r.cold.host_blocks = host_blocks;
            self.counters.preemptions_swap += 1;
            self.counters.swapped_out_blocks += n as u64;
            r.status = Status::Swapped;
            self.swapped.insert(key(&r, slot));
        } else {
            r.cold.computed_before_preemption =
                r.cold.computed_before_preemption.max(r.num_computed);
            r.num_computed = 0;
            self.counters.preemptions_recompute += 1;
            r.status = Status::Waiting;
            self.waiting.insert(key(&r, slot));
        }
        // Tail blocks first, so the LRU evicts a sequence's tail before its prefix.
        for &b in r.blocks.iter().rev() {
            self.gpu.decref(b);
        }
        r.blocks.clear();
        r.blocks_gen = r.blocks_gen.wrapping_add(1);
        r.num_registered_blocks = 0;
        self.slots[slot] = Some(r);
    }

    /// Whether an admission may take `need` more blocks out of `available`, keeping the
    /// watermark for running decodes (unless nothing runs, so nothing starves).
    fn admissible(&self, available: usize, need: usize) -> bool {
        if available < need {
            return false;
        }
        self.running.is_empty() || available - need >= self.cfg.watermark_blocks()
    }

    fn swap_in_phase(
        &mut self,
        budget: &mut usize,
        sched: &mut Vec<Scheduled>,
        swap_in: &mut Vec<i64>,
    ) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&(prio, arr, slot)) = self.swapped.first() else {
                break;
            };
            let (num_new, need) = {
                let r = self.req(slot);
                let num_new = r.num_uncomputed().min(*budget);
                (num_new, self.cfg.blocks_for(r.num_computed + num_new))
            };
            if !self.admissible(self.gpu.num_available(), need) {
                break;
            }
            self.swapped.remove(&(prio, arr, slot));
            self.grow(slot, need);
            let r = self.slots[slot]
                .as_mut()
                .expect("swapped slot holds a request");
            for (h, g) in r.cold.host_blocks.iter().zip(&r.blocks) {
                swap_in.push(i64::from(*h));
                swap_in.push(i64::from(*g));
            }
            self.counters.swapped_in_blocks += r.cold.host_blocks.len() as u64;
            for &h in &r.cold.host_blocks {
                self.host.decref(h);
            }
            r.cold.host_blocks.clear();
            r.status = Status::Running;
            self.running.push(slot);
            sched.push(Scheduled::new(slot, self.req(slot), num_new));
            *budget -= num_new;
        }
    }

    fn admit_phase(
        &mut self,
        budget: &mut usize,
        sched: &mut Vec<Scheduled>,
        copies: &mut Vec<i64>,
    ) {
        let bs = self.cfg.block_size;
        let mut hit: Vec<u32> = Vec::new();
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&(prio, arr, slot)) = self.waiting.first() else {
                break;
            };
            // Longest cached prefix of full blocks.
            hit.clear();
            if self.cfg.enable_prefix_caching {
                let r = self.slots[slot]
                    .as_mut()
                    .expect("waiting slot holds a request");
                extend_hashes(&mut r.cold.block_hashes, r.cold.root_hash, &r.tokens, bs);
                for &h in &r.cold.block_hashes {
                    match self.prefix.get(h) {
                        Some(b) => hit.push(b),
                        None => break,
                    }
                }
            }
            let r = self.req(slot);
            let len = r.num_tokens();
            // A whole-prompt hit still recomputes the last token, into a copy of the last
            // cached block (copy-on-write), so the model produces its logits.
            let cow_src = if hit.len() * bs == len {
                hit.pop()
            } else {
                None
            };
            let computed = if cow_src.is_some() {
                len - 1
            } else {
                hit.len() * bs
            };
            let num_new = (len - computed).min(*budget);
            let total_blocks = self.cfg.blocks_for(computed + num_new);
            let need = total_blocks - hit.len();
            // Hit blocks that sit on the LRU list stop being available once taken.
            let mut taken = hit
                .iter()
                .filter(|&&b| self.gpu.is_cached_evictable(b))
                .count();
            if let Some(src) = cow_src {
                taken += usize::from(self.gpu.is_cached_evictable(src));
            }
            let available = self.gpu.num_available() - taken;
            if !self.admissible(available, need) {
                break;
            }

            // Counters: what was asked of the cache, what it served, what is recomputed.
            let prev = r.cold.computed_before_preemption;
            let mut recomputed = prev.saturating_sub(computed);
            if self.cfg.enable_prefix_caching {
                let first = computed.max(prev).div_ceil(bs);
                recomputed += r.cold.block_hashes[first.min(r.cold.block_hashes.len())..]
                    .iter()
                    .filter(|&&h| self.prefix.was_evicted(h))
                    .count()
                    * bs;
            }
            self.counters.prefix_queries_tokens += len as u64;
            self.counters.prefix_hits_tokens += computed as u64;
            self.counters.recomputed_tokens += recomputed as u64;

            self.waiting.remove(&(prio, arr, slot));
            for &b in &hit {
                self.gpu.incref(b);
            }
            if let Some(src) = cow_src {
                self.gpu.incref(src); // pinned so the copy's own allocation can't evict it
            }
            let mut r = self.slots[slot]
                .take()
                .expect("waiting slot holds a request");
            r.blocks.clear();
            r.blocks_gen = r.blocks_gen.wrapping_add(1);
            r.blocks.extend_from_slice(&hit);
            r.num_registered_blocks = hit.len();
            r.num_computed = computed;
            r.cold.computed_before_preemption = 0;
            if !r.cold.admitted_once {
                r.cold.admitted_once = true;
                r.cold.cached_prompt_tokens = computed;
            }
            r.status = Status::Running;
            self.slots[slot] = Some(r);
            let first_new = self.req(slot).blocks.len();
            self.grow(slot, need);
            if let Some(src) = cow_src {
                let dst = self.req(slot).blocks[first_new];
                copies.push(i64::from(src));
                copies.push(i64::from(dst));
                self.counters.cow_copies += 1;
                self.gpu.decref(src);
            }
            self.running.push(slot);
            sched.push(Scheduled::new(slot, self.req(slot), num_new));
            *budget -= num_new;
        }
    }

    fn build_plan(
        &mut self,
        sched: Vec<Scheduled>,
        swap_out: Vec<i64>,
        swap_in: Vec<i64>,
        copies: Vec<i64>,
    ) -> Plan {
        let shift = self.cfg.block_shift();
        let mask = self.cfg.block_size - 1;
        // Decodes (one new token that is sampled) first, everything else after, stable.
        // A steady decode batch is in that order already and is used as it is.
        let mut ordered = std::mem::take(&mut self.scratch.ordered);
        ordered.clear();
        let first_other = sched.iter().position(|s| !s.decode).unwrap_or(sched.len());
        let as_is =
            sched.iter().all(|s| !s.removed) && sched[first_other..].iter().all(|s| !s.decode);
        if !as_is {
            ordered.extend(sched.iter().filter(|s| !s.removed && s.decode));
            ordered.extend(sched.iter().filter(|s| !s.removed && !s.decode));
        }
        let (ordered, spare) = if as_is {
            (sched, ordered)
        } else {
            (ordered, sched)
        };
        let num_decodes = ordered.iter().take_while(|s| s.decode).count();

        let num_seqs = ordered.len();
        let num_tokens: usize = ordered.iter().map(|s| s.num_new).sum();
        let max_blocks = ordered.iter().map(|s| s.num_blocks).max().unwrap_or(0);
        let mut plan = self.scratch.plan.take().unwrap_or_default();
        plan.id = self.next_plan_id;
        plan.num_seqs = num_seqs;
        plan.num_tokens = num_tokens;
        plan.num_decodes = num_decodes;
        plan.max_blocks = max_blocks;
        plan.swap_out = swap_out;
        plan.swap_in = swap_in;
        plan.copies = copies;
        for v in [&mut plan.handles, &mut plan.sample_handles] {
            v.clear();
            v.reserve(num_seqs);
        }
        for v in [
            &mut plan.input_ids,
            &mut plan.positions,
            &mut plan.slot_mapping,
        ] {
            v.clear();
            v.reserve(num_tokens);
        }
        plan.logits_indices.clear();
        plan.logits_indices.reserve(num_seqs);
        for v in [&mut plan.query_start_loc, &mut plan.seq_lens] {
            v.clear();
            v.reserve(num_seqs + 1);
        }
        self.next_plan_id += 1;
        let mut pending = Pending {
            plan_id: plan.id,
            seqs: std::mem::take(&mut self.scratch.seqs),
            samples: std::mem::take(&mut self.scratch.samples),
        };
        pending.seqs.clear();
        pending.samples.clear();
        plan.query_start_loc.push(0);
        let slots = &self.slots;
        let batch = &mut self.batch;
        batch.begin(num_seqs, max_blocks, slots.len());
        let recent = &self.recent;
        // Decode rows first, column by column: each is one token at position `start`,
        // sampled, so every array is a straight map over the entries (one reserve, no
        // per-element capacity checks).
        let decodes = &ordered[..num_decodes];
        for (i, s) in decodes.iter().enumerate() {
            let key = RowKey {
                handle: s.handle,
                blocks_gen: s.blocks_gen,
            };
            batch.set_row(i, s.slot, key, s.num_blocks, || {
                &slots[s.slot]
                    .as_ref()
                    .expect("scheduled slot holds a request")
                    .blocks
            });
        }
        plan.handles.extend(decodes.iter().map(|s| s.handle));
        plan.input_ids.extend(decodes.iter().map(|s| s.last_token));
        plan.positions
            .extend(decodes.iter().map(|s| s.start as i64));
        plan.slot_mapping
            .extend(decodes.iter().enumerate().map(|(i, s)| {
                (i64::from(batch.block(i, s.start >> shift)) << shift) | (s.start & mask) as i64
            }));
        plan.query_start_loc
            .extend((1..=num_decodes).map(|k| k as i32));
        plan.seq_lens
            .extend(decodes.iter().map(|s| (s.start + 1) as i32));
        plan.logits_indices.extend(0..num_decodes as i64);
        plan.sample_handles.extend(decodes.iter().map(|s| s.handle));
        pending
            .samples
            .extend(decodes.iter().map(|s| (s.slot, s.handle)));
        pending
            .seqs
            .extend(decodes.iter().map(|s| (s.slot, s.handle, 1)));
        for (i, s) in ordered.iter().enumerate().skip(num_decodes) {
            let rec = || {
                slots[s.slot]
                    .as_ref()
                    .expect("scheduled slot holds a request")
            };
            let start = s.start;
            let end = start + s.num_new;
            let key = RowKey {
                handle: s.handle,
                blocks_gen: s.blocks_gen,
            };
            // Reads the request's block list only for blocks the last table lacks.
            batch.set_row(i, s.slot, key, s.num_blocks, || &rec().blocks);
            plan.handles.push(s.handle);
            if s.decode {
                // The cached last token spares a cache miss on the token Vec's tail.
                plan.input_ids.push(s.last_token);
            } else {
                let r = rec();
                let flushed = r.tokens.len();
                if end <= flushed {
                    plan.input_ids.extend_from_slice(&r.tokens[start..end]);
                } else {
                    let pending = recent.pending(r, s.slot);
                    plan.input_ids.extend((start..end).map(|p| {
                        if p < flushed {
                            r.tokens[p]
                        } else {
                            pending[p - flushed]
                        }
                    }));
                }
            }
            for p in start..end {
                plan.positions.push(p as i64);
                let block = i64::from(batch.block(i, p >> shift));
                plan.slot_mapping.push((block << shift) | (p & mask) as i64);
            }
            plan.query_start_loc.push(plan.input_ids.len() as i32);
            plan.seq_lens.push(end as i32);
            if end == s.num_tokens {
                plan.logits_indices.push(plan.input_ids.len() as i64 - 1);
                plan.sample_handles.push(s.handle);
                pending.samples.push((s.slot, s.handle));
            }
            pending.seqs.push((s.slot, s.handle, s.num_new));
        }
        // The table stays here; callers read or copy it (block_table, sync_block_table).
        batch.finish(num_seqs);
        self.scratch.sched = ordered;
        self.scratch.ordered = spare;
        // A decode-only plan is kept as the steady batch the next step may start from.
        let sb = &mut self.steady;
        sb.committed = false;
        if num_decodes == num_seqs && num_seqs > 0 && self.steady_path {
            sb.plan_id = plan.id;
            sb.intact = true;
            for (dst, src) in [
                (&mut sb.positions, &plan.positions),
                (&mut sb.slot_mapping, &plan.slot_mapping),
            ] {
                dst.clear();
                dst.extend_from_slice(src);
            }
            sb.handles.clear();
            sb.handles.extend_from_slice(&plan.handles);
            sb.stops.clear();
            let slots = &self.slots;
            sb.stops.extend(self.scratch.sched.iter().map(|s| {
                StopRule::of(
                    slots[s.slot]
                        .as_ref()
                        .expect("scheduled slot holds a request"),
                )
            }));
        } else {
            sb.plan_id = u64::MAX;
        }
        self.counters.steps += 1;
        self.counters.tokens_scheduled_last_step = num_tokens as u64;
        self.counters.seqs_scheduled_last_step = num_seqs as u64;
        self.counters.tokens_scheduled_total += num_tokens as u64;
        self.pending = Some(pending);
        plan
    }

    // ---------------------------------------------------------------- commit

    /// Applies the sampled tokens of the latest plan. Rows whose request was aborted or
    /// finished since `schedule` are skipped.
    pub fn commit(&mut self, plan_id: u64, sampled: &[i64]) -> CoreResult<StepOutput> {
        let p = match &self.pending {
            Some(p) if p.plan_id == plan_id => p,
            Some(p) => {
                return Err(CoreError::StalePlan {
                    msg: format!("plan {plan_id} is not the latest plan ({})", p.plan_id),
                })
            }
            None => {
                return Err(CoreError::StalePlan {
                    msg: format!("plan {plan_id} was already committed or never issued"),
                })
            }
        };
        if sampled.len() != p.samples.len() {
            return Err(invalid(
                "sampled_token_ids",
                format!(
                    "got {} tokens; plan {plan_id} has {} sample rows",
                    sampled.len(),
                    p.samples.len()
                ),
            ));
        }
        if let Some(t) = sampled.iter().find(|&&t| t < 0) {
            return Err(invalid(
                "sampled_token_ids",
                format!("token id {t} is negative"),
            ));
        }
        let Some(p) = self.pending.take() else {
            return Err(CoreError::StalePlan {
                msg: "no plan".into(),
            });
        };
        let mut out = self.scratch.output.take().unwrap_or_default();
        out.handles.clear();
        out.handles.reserve(sampled.len());
        out.token_ids.clear();
        out.token_ids.reserve(sampled.len());
        out.finished_handles.clear();
        out.finish_reasons.clear();
        out.finished_ids.clear();
        // A steady batch's plan with no request ended since: every row is a running
        // decode with a sample, so the full path's per-row checks are not needed.
        let steady = self.steady.plan_id == plan_id && self.steady.intact;
        let any_finished = if steady {
            self.commit_steady_rows(&p, sampled, &mut out)
        } else {
            self.commit_rows(&p, sampled, &mut out)
        };
        if any_finished {
            let slots = &self.slots;
            self.running.retain(|&s| slots[s].is_some());
        }
        // Every row of a steady batch's plan took its token and runs on: the next step
        // may start from the batch.
        let sb = &mut self.steady;
        sb.committed = steady && !any_finished;
        if sb.committed {
            sb.tokens.clear();
            sb.tokens.extend_from_slice(sampled);
        }
        self.recycle(p);
        Ok(out)
    }

    /// `commit`'s rows for any plan: sampled rows are a subsequence of the plan's
    /// sequences, in order; rows whose request ended since `schedule` are skipped. Returns
    /// whether a request finished.
    fn commit_rows(&mut self, p: &Pending, sampled: &[i64], out: &mut StepOutput) -> bool {
        let bs = self.cfg.block_size;
        let caching = self.cfg.enable_prefix_caching;
        let mut any_finished = false;
        let mut next_sample = 0;
        for &(slot, handle, num_new) in &p.seqs {
            let tok = match p.samples.get(next_sample) {
                Some(&(s, h)) if s == slot && h == handle => {
                    next_sample += 1;
                    Some(sampled[next_sample - 1])
                }
                _ => None,
            };
            let Some(r) = self.slots[slot].as_mut().filter(|r| r.handle == handle) else {
                continue;
            };
            if r.status != Status::Running {
                continue;
            }
            r.num_computed += num_new;
            if caching {
                register_full_blocks(r, slot, &self.recent, &mut self.gpu, &mut self.prefix, bs);
            }
            let Some(tok) = tok else { continue };
            self.recent.push(r, slot, tok);
            r.last_token = tok;
            out.handles.push(handle);
            out.token_ids.push(tok);
            if let Some(reason) = r.stop_reason(tok) {
                self.stop(out, slot, handle, reason);
                any_finished = true;
            }
        }
        any_finished
    }

    /// `commit_rows` for the steady batch's plan (see `SteadyBatch`): one decode per row,
    /// all sampled, all running; the record's stop fields are read only when the batch's
    /// copy says the token may stop the request.
    fn commit_steady_rows(&mut self, p: &Pending, sampled: &[i64], out: &mut StepOutput) -> bool {
        let bs = self.cfg.block_size;
        let caching = self.cfg.enable_prefix_caching;
        let mask = bs - 1;
        let mut any_finished = false;
        out.handles.extend_from_slice(&self.steady.handles);
        out.token_ids.extend_from_slice(sampled);
        // Taken out for the loop (`stop` needs all of self); put back below.
        let sb = std::mem::take(&mut self.steady);
        let rows = p.seqs.iter().zip(sampled).zip(&sb.positions);
        for (((&(slot, handle, _), &tok), &pos), rule) in rows.zip(&sb.stops) {
            let r = self.slots[slot]
                .as_mut()
                .expect("steady row holds a request");
            r.num_computed += 1;
            // Every commit registers the blocks it fills, so only a step that fills one
            // has anything to register (and only then is the record's second line read).
            if caching && r.num_computed & mask == 0 {
                register_full_blocks(r, slot, &self.recent, &mut self.gpu, &mut self.prefix, bs);
            }
            self.recent.push(r, slot, tok);
            r.last_token = tok;
            // Tokens once `tok` is appended: its position, one past the input's.
            let num_tokens = pos as usize + 2;
            debug_assert_eq!(num_tokens, r.num_tokens());
            if !rule.may_stop(num_tokens, tok) {
                continue;
            }
            if let Some(reason) = r.stop_reason(tok) {
                self.stop(out, slot, handle, reason);
                any_finished = true;
            }
        }
        self.steady = sb;
        any_finished
    }

    /// Ends a request its sampled token stopped: the output's finished entry, then `remove`.
    fn stop(&mut self, out: &mut StepOutput, slot: usize, handle: u64, reason: &'static str) {
        out.finished_handles.push(handle);
        out.finish_reasons.push(reason);
        out.finished_ids.push(self.req(slot).cold.id.clone());
        self.remove(slot, reason, false);
    }

    // ---------------------------------------------------------------- finish / abort

    /// Ends a live request for a reason found outside the core (e.g. a stop string).
    pub fn finish(&mut self, id: &str, reason: &str) -> bool {
        self.end(id, reason, false)
    }

    /// Frees everything a request holds; unknown id -> false.
    pub fn abort(&mut self, id: &str) -> bool {
        self.end(id, "abort", true)
    }

    fn end(&mut self, id: &str, reason: &str, aborted: bool) -> bool {
        let Some(&slot) = self.by_id.get(id) else {
            return false;
        };
        self.steady.committed = false;
        self.steady.intact = false;
        self.remove(slot, reason, aborted);
        self.running.retain(|&s| s != slot);
        true
    }

    /// Removes a request from every queue and frees its blocks. `running` is left for
    /// the caller to compact (commit does it once per step).
    fn remove(&mut self, slot: usize, reason: &str, aborted: bool) {
        let Some(r) = self.slots[slot].take() else {
            return;
        };
        match r.status {
            Status::Waiting => {
                self.waiting.remove(&key(&r, slot));
            }
            Status::Swapped => {
                self.swapped.remove(&key(&r, slot));
            }
            Status::Running => {}
        }
        for &b in r.blocks.iter().rev() {
            self.gpu.decref(b);
        }
        for &h in &r.cold.host_blocks {
            self.host.decref(h);
        }
        self.by_id.remove(&r.cold.id);
        self.free_slots.push(slot);
        if aborted {
            self.counters.requests_aborted += 1;
        } else {
            self.counters.requests_finished += 1;
        }
        let stats = RequestStats {
            handle: r.handle,
            prompt_tokens: r.cold.num_prompt_tokens,
            output_tokens: r.num_output_tokens(),
            cached_prompt_tokens: r.cold.cached_prompt_tokens,
            num_computed_tokens: r.num_computed,
            num_preemptions: r.cold.num_preemptions,
            state: if aborted {
                "aborted".into()
            } else {
                format!("finished:{reason}")
            },
        };
        if self.finished.insert(r.cold.id.clone(), stats).is_none() {
            self.finished_order.push_back(r.cold.id);
        }
        while self.finished_order.len() > FINISHED_MEMORY {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }

    /// Stats of a live or recently finished request.
    pub fn request_stats(&self, id: &str) -> CoreResult<RequestStats> {
        if let Some(r) = self.request(id) {
            return Ok(RequestStats {
                handle: r.handle,
                prompt_tokens: r.cold.num_prompt_tokens,
                output_tokens: r.num_output_tokens(),
                cached_prompt_tokens: r.cold.cached_prompt_tokens,
                num_computed_tokens: r.num_computed,
                num_preemptions: r.cold.num_preemptions,
                state: r.status.as_str().into(),
            });
        }
        self.finished
            .get(id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownRequest(id.into()))
    }
}

/// Registers the request's newly computed full blocks in the prefix cache.
fn register_full_blocks(
    r: &mut Request,
    slot: usize,
    recent: &RecentTokens,
    gpu: &mut BlockPool,
    prefix: &mut PrefixCache,
    bs: usize,
) {
    let full = r.num_computed >> bs.trailing_zeros();
    if full <= r.num_registered_blocks {
        return;
    }
    // Hashing reads the block's tokens, some of which may still be in the recent buffer.
    recent.flush(r, slot);
    extend_hashes(
        &mut r.cold.block_hashes,
        r.cold.root_hash,
        &r.tokens[..full * bs],
        bs,
    );
    for i in r.num_registered_blocks..full {
        let b = r.blocks[i];
        if gpu.hash(b).is_none() {
            let h = r.cold.block_hashes[i];
            // Another block may already hold this prefix (computed side by side):
            // keep that one and let this block go back to the free list when released.
            if prefix.insert(h, b) {
                gpu.set_hash(b, h);
            }
        }
    }
    r.num_registered_blocks = full;
}
