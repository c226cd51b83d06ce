//! Admission: `add_request` (validation and queueing), and the phases of `schedule` that
//! take new work: swap-in of swapped requests, then waiting requests with prefix reuse.

use crate::error::{invalid, CoreError, CoreResult};
use crate::prefix_cache::{extend_hashes, root_hash};
use crate::request::{Request, RequestParams, Status};

use super::{key, Scheduled, Scheduler};

impl Scheduler {
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

    /// Whether an admission may take `need` more blocks out of `available`, keeping the
    /// watermark for running decodes (unless nothing runs, so nothing starves).
    fn admissible(&self, available: usize, need: usize) -> bool {
        if available < need {
            return false;
        }
        self.running.is_empty() || available - need >= self.cfg.watermark_blocks()
    }

    pub(super) fn swap_in_phase(
        &mut self,
        budget: &mut usize,
        sched: &mut Vec<Scheduled>,
        swap_in: &mut Vec<i64>,
    ) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&queued) = self.swapped.first() else {
                break;
            };
            let slot = queued.slot;
            let (num_new, need) = {
                let r = self.req(slot);
                let num_new = r.num_uncomputed().min(*budget);
                (num_new, self.cfg.blocks_for(r.num_computed + num_new))
            };
            if !self.admissible(self.gpu.num_available(), need) {
                break;
            }
            self.swapped.remove(&queued);
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

    pub(super) fn admit_phase(
        &mut self,
        budget: &mut usize,
        sched: &mut Vec<Scheduled>,
        copies: &mut Vec<i64>,
    ) {
        let bs = self.cfg.block_size;
        let mut hit: Vec<u32> = Vec::new();
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&queued) = self.waiting.first() else {
                break;
            };
            let slot = queued.slot;
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

            self.waiting.remove(&queued);
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
}
