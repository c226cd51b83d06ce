//! The end of a request's life: finish, abort, freeing its blocks, and the stats
//! `request_stats` reports for live and recently ended requests.

use crate::error::{CoreError, CoreResult};
use crate::request::{Request, Status};

use super::{key, Scheduler};

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

/// How many records the core keeps, by kind: each is bounded by the live requests or by
/// the config, never by how many requests came before (`Scheduler::retained`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// Request slots (live plus free for reuse) and ids of live requests.
    pub slots: usize,
    pub live_ids: usize,
    /// Ended requests `request_stats` answers for, and their order queue.
    pub finished: usize,
    pub finished_order: usize,
    /// Remembered evicted digests and their FIFO.
    pub evicted: usize,
    pub evicted_fifo: usize,
    /// KV events not yet drained.
    pub kv_events: usize,
    /// Digests of cached blocks.
    pub cached_digests: usize,
}

impl RequestStats {
    fn of(r: &Request, state: String) -> Self {
        RequestStats {
            handle: r.handle,
            prompt_tokens: r.cold.num_prompt_tokens,
            output_tokens: r.num_output_tokens(),
            cached_prompt_tokens: r.cold.cached_prompt_tokens,
            num_computed_tokens: r.num_computed,
            num_preemptions: r.cold.num_preemptions,
            state,
        }
    }
}

/// What `finish` and `abort` report about the request they ended: its handle (the
/// caller's key) and the prompt tokens it had served from the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub handle: u64,
    pub cached_prompt_tokens: usize,
}

impl Scheduler {
    /// The sizes of the core's records (see `Retained`).
    pub fn retained(&self) -> Retained {
        let (finished, finished_order) = self.finished.len();
        let (evicted, evicted_fifo, kv_events) = self.prefix.record_lens();
        Retained {
            slots: self.slots.len(),
            live_ids: self.by_id.len(),
            finished,
            finished_order,
            evicted,
            evicted_fifo,
            kv_events,
            cached_digests: self.prefix.len(),
        }
    }

    /// Ends a live request for a reason found outside the core (e.g. a stop string);
    /// unknown id -> None.
    pub fn finish(&mut self, id: &str, reason: &str) -> Option<Ended> {
        self.end(id, reason, false)
    }

    /// Frees everything a request holds; unknown id -> None.
    pub fn abort(&mut self, id: &str) -> Option<Ended> {
        self.end(id, "abort", true)
    }

    fn end(&mut self, id: &str, reason: &str, aborted: bool) -> Option<Ended> {
        let &slot = self.by_id.get(id)?;
        self.steady.committed = false;
        self.steady.intact = false;
        let ended = self.remove(slot, reason, aborted);
        self.running.retain(|&s| s != slot);
        ended
    }

    /// Removes a request from every queue and frees its blocks. `running` is left for
    /// the caller to compact (commit does it once per step).
    pub(super) fn remove(&mut self, slot: usize, reason: &str, aborted: bool) -> Option<Ended> {
        let r = self.slots[slot].take()?;
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
        let state = if aborted {
            self.counters.requests_aborted += 1;
            "aborted".into()
        } else {
            self.counters.requests_finished += 1;
            format!("finished:{reason}")
        };
        let ended = Ended {
            handle: r.handle,
            cached_prompt_tokens: r.cold.cached_prompt_tokens,
        };
        let stats = RequestStats::of(&r, state);
        self.finished.record(r.cold.id, stats);
        Some(ended)
    }

    /// Stats of a live or recently finished request.
    pub fn request_stats(&self, id: &str) -> CoreResult<RequestStats> {
        if let Some(r) = self.request(id) {
            return Ok(RequestStats::of(r, r.status.as_str().into()));
        }
        self.finished
            .get(id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownRequest(id.into()))
    }
}
