//! `commit`: a plan's sampled tokens appended, computed blocks registered in the prefix
//! cache, stop conditions checked.

use crate::block_pool::BlockPool;
use crate::error::{invalid, CoreError, CoreResult};
use crate::plan::StepOutput;
use crate::prefix_cache::{extend_hashes, PrefixCache};
use crate::recent_tokens::RecentTokens;
use crate::request::{Request, Status};

use super::{Pending, PlannedRow, Scheduler};

impl Scheduler {
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
        // The runner finished the plan's copies before committing it.
        self.complete_copies();
        let mut out = self.scratch.output.take().unwrap_or_default();
        out.handles.clear();
        out.handles.reserve(sampled.len());
        out.token_ids.clear();
        out.token_ids.reserve(sampled.len());
        out.finished_handles.clear();
        out.finish_reasons.clear();
        out.finished_ids.clear();
        out.finished_cached_prompt_tokens.clear();
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
        for &PlannedRow {
            slot,
            handle,
            num_new,
        } in &p.seqs
        {
            let tok = match p.samples.get(next_sample) {
                Some(s) if s.slot == slot && s.handle == handle => {
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
        for (((row, &tok), &pos), rule) in rows.zip(&sb.stops) {
            let (slot, handle) = (row.slot, row.handle);
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
        let r = self.req(slot);
        out.finished_ids.push(r.cold.id.clone());
        out.finished_cached_prompt_tokens
            .push(r.cold.cached_prompt_tokens as u64);
        self.remove(slot, reason, false);
    }

    /// Hands a used step output back for the next `commit` to refill.
    pub fn recycle_output(&mut self, out: StepOutput) {
        self.scratch.output = Some(out);
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
