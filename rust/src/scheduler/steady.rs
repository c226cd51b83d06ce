//! The steady decode batch: the next plan of an unchanged decode-only batch, built from
//! the last plan's dense columns instead of every request record.

use crate::batch_table::RowKey;
use crate::plan::Plan;
use crate::request::Request;

use super::{DecodePlanShape, Pending, Scheduler};

/// The last plan when it was decode-only, as dense columns, so that the next step, if
/// nothing but its commit happened in between, is planned from these alone: every row
/// advances one position and takes the token just sampled, and only a row that starts a
/// new block visits its request record (to grow). A steady decode batch then costs a few
/// sequential passes over small arrays instead of a visit to every request record.
#[derive(Debug, Default)]
pub(super) struct SteadyBatch {
    /// The plan these columns describe (u64::MAX: none).
    pub(super) plan_id: u64,
    /// That plan was committed with every row sampled and none finished, nothing else is
    /// running, waiting or swapped, and no request was added or ended since.
    pub(super) committed: bool,
    pub(super) handles: Vec<u64>,
    pub(super) positions: Vec<i64>,
    pub(super) slot_mapping: Vec<i64>,
    /// No request ended since that plan was made: all its rows still run.
    pub(super) intact: bool,
    /// The tokens its commit sampled: the next step's input ids.
    pub(super) tokens: Vec<i64>,
    /// Each row's stop conditions (fixed for a request's life), so commit reads its
    /// record only when a token may stop it.
    pub(super) stops: Vec<StopRule>,
    /// Rows that need a new block this step (scratch).
    pub(super) growing: Vec<usize>,
}

/// A request's stop conditions, copied from its record (see `Request::stop_reason`).
#[derive(Debug, Clone, Copy)]
pub(super) struct StopRule {
    pub(super) min_len: usize,
    pub(super) length_limit: usize,
    pub(super) stop_eos: i64,
    pub(super) has_stop_ids: bool,
}

impl StopRule {
    pub(super) fn of(r: &Request) -> Self {
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
    pub(super) fn may_stop(&self, num_tokens: usize, token: i64) -> bool {
        num_tokens >= self.length_limit
            || (num_tokens >= self.min_len && (token == self.stop_eos || self.has_stop_ids))
    }
}

impl Scheduler {
    /// The next plan of a steady decode batch (see `SteadyBatch`), or None when the full
    /// path must run: something other than the last commit happened, or the rows that
    /// start a new block need more blocks than are free (the full path preempts).
    pub(super) fn schedule_steady(&mut self) -> Option<Plan> {
        let n = self.steady.handles.len();
        if !(self.steady_path
            && self.steady.committed
            && !self.gpu.has_lru_entries()
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
            let slot = self.scratch.seqs[i].slot;
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
        // Every row one position on with the token just committed; the table changed
        // only if a row grew.
        plan.continues_plan_id = sb.growing.is_empty().then_some(sb.plan_id);
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
        plan.offloads.clear();
        plan.loads.clear();
        plan.set_advances_in_place(self.cfg.block_size, self.cfg.max_model_len);
        // The last plan's rows, unchanged: (slot, handle, 1) and (slot, handle).
        self.pending = Some(Pending {
            plan_id: plan.id,
            seqs: std::mem::take(&mut self.scratch.seqs),
            samples: std::mem::take(&mut self.scratch.samples),
        });
        sb.plan_id = plan.id;
        sb.intact = true;
        self.steady = sb;
        self.last_decode_plan = DecodePlanShape::of(&plan);
        self.counters.steps += 1;
        self.counters.steps_steady += 1;
        self.counters.tokens_scheduled_last_step = n as u64;
        self.counters.seqs_scheduled_last_step = n as u64;
        self.counters.tokens_scheduled_total += n as u64;
        Some(plan)
    }

    /// Keeps a plan the full path built as the steady batch the next step may start from,
    /// if it is decode-only.
    pub(super) fn keep_steady_batch(&mut self, plan: &Plan) {
        let sb = &mut self.steady;
        sb.committed = false;
        // A plan that swaps blocks in is committed by the full path: the swapped-in rows'
        // full blocks are registered there (the steady commit registers only a block a
        // step fills), so a request that ends before its next block fills still leaves
        // them cached.
        if plan.num_decodes == plan.num_seqs
            && plan.num_seqs > 0
            && plan.swap_in.is_empty()
            && self.steady_path
        {
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
    }
}
