//! The plan built from one step's scheduled rows: decodes first, then prefill chunks, as
//! flat columns; and the block table the plan's columns describe.

use crate::batch_table::RowKey;
use crate::error::{invalid, CoreResult};
use crate::plan::Plan;
use crate::request::Request;

use super::Scheduler;

/// One sequence scheduled in the current step, with the request fields the plan needs,
/// copied while the request's record is in cache: building the plan then streams through
/// these instead of visiting every record a second time. A scheduled request changes only
/// by being preempted later in the same step, which marks its entry `removed`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scheduled {
    pub(super) slot: usize,
    pub(super) num_new: usize,
    /// Blocks the sequence holds for this step (its block-table row length).
    pub(super) num_blocks: usize,
    pub(super) handle: u64,
    /// Tokens computed before this step (the first new token's position).
    pub(super) start: usize,
    /// Prompt plus output tokens (the context length once this step is done, if sampled).
    pub(super) num_tokens: usize,
    pub(super) last_token: i64,
    pub(super) blocks_gen: u32,
    /// One new token that completes the context (sampled): a decode row.
    pub(super) decode: bool,
    pub(super) removed: bool,
}

impl Scheduled {
    pub(super) fn new(slot: usize, r: &Request, num_new: usize) -> Self {
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

/// A plan's block copies (see `Plan`).
#[derive(Debug, Default)]
pub(super) struct CopyLists {
    pub(super) swap_out: Vec<i64>,
    pub(super) swap_in: Vec<i64>,
    pub(super) copies: Vec<i64>,
    pub(super) offloads: Vec<i64>,
    pub(super) loads: Vec<i64>,
}

/// What the next plan needs to know of a decode-only plan to tell whether it continues it.
#[derive(Debug, Clone, Copy)]
pub(super) struct DecodePlanShape {
    pub(super) id: u64,
    pub(super) num_seqs: usize,
    pub(super) max_blocks: usize,
}

impl DecodePlanShape {
    /// The shape of `plan` if it is decode-only and not empty.
    pub(super) fn of(plan: &Plan) -> Option<Self> {
        (plan.num_seqs > 0 && plan.num_decodes == plan.num_seqs).then_some(DecodePlanShape {
            id: plan.id,
            num_seqs: plan.num_seqs,
            max_blocks: plan.max_blocks,
        })
    }
}

/// One row of a plan: the request in `slot` (checked by `handle`) gets `num_new` tokens.
#[derive(Debug, Clone, Copy)]
pub(super) struct PlannedRow {
    pub(super) slot: usize,
    pub(super) handle: u64,
    pub(super) num_new: usize,
}

/// One row of a plan that samples a token.
#[derive(Debug, Clone, Copy)]
pub(super) struct SampleRow {
    pub(super) slot: usize,
    pub(super) handle: u64,
}

/// The last plan, kept until it is committed.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) plan_id: u64,
    pub(super) seqs: Vec<PlannedRow>,
    pub(super) samples: Vec<SampleRow>,
}

impl Scheduler {
    pub(super) fn build_plan(&mut self, sched: Vec<Scheduled>, lists: CopyLists) -> Plan {
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
        plan.swap_out = lists.swap_out;
        plan.swap_in = lists.swap_in;
        plan.copies = lists.copies;
        plan.offloads = lists.offloads;
        plan.loads = lists.loads;
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
        // The previous plan's step one on needs the same shape; its rows are checked below.
        let same_shape = num_decodes == num_seqs
            && plan.swap_out.is_empty()
            && plan.swap_in.is_empty()
            && plan.copies.is_empty()
            && plan.offloads.is_empty()
            && plan.loads.is_empty()
            && self
                .last_decode_plan
                .is_some_and(|last| last.num_seqs == num_seqs && last.max_blocks == max_blocks);
        let mut rows_unchanged = true;
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
            rows_unchanged &= batch.set_row(i, s.slot, key, s.num_blocks, || {
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
        pending.samples.extend(decodes.iter().map(|s| SampleRow {
            slot: s.slot,
            handle: s.handle,
        }));
        pending.seqs.extend(decodes.iter().map(|s| PlannedRow {
            slot: s.slot,
            handle: s.handle,
            num_new: 1,
        }));
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
                pending.samples.push(SampleRow {
                    slot: s.slot,
                    handle: s.handle,
                });
            }
            pending.seqs.push(PlannedRow {
                slot: s.slot,
                handle: s.handle,
                num_new: s.num_new,
            });
        }
        // The table stays here; callers read or copy it (block_table, sync_block_table).
        batch.finish(num_seqs);
        self.scratch.sched = ordered;
        self.scratch.ordered = spare;
        // Same rows with the same blocks, all decodes: each sat in the previous plan's
        // row as a decode (a block generation changes on preemption), so it is one
        // position on and its input is the token that plan's commit sampled.
        plan.continues_plan_id = self
            .last_decode_plan
            .filter(|_| same_shape && rows_unchanged)
            .map(|last| last.id);
        plan.set_advances_in_place(self.cfg.block_size, self.cfg.max_model_len);
        self.last_decode_plan = DecodePlanShape::of(&plan);
        self.keep_steady_batch(&plan);
        self.counters.steps += 1;
        self.counters.tokens_scheduled_last_step = num_tokens as u64;
        self.counters.seqs_scheduled_last_step = num_seqs as u64;
        self.counters.tokens_scheduled_total += num_tokens as u64;
        self.pending = Some(pending);
        plan
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
    /// allocating (optional: pure-Rust callers; the Python binding hands the Vecs to numpy).
    pub fn recycle_plan(&mut self, plan: Plan) {
        self.scratch.plan = Some(plan);
    }
}
