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
        loads: &mut Vec<i64>,
    ) {
        let bs = self.cfg.block_size;
        let mut hit: Vec<Hit> = Vec::new();
        let mut fresh: Vec<u32> = Vec::new();
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&queued) = self.waiting.first() else {
                break;
            };
            let slot = queued.slot;
            // Longest cached prefix of full blocks, each on the GPU or else on the host.
            hit.clear();
            if self.cfg.enable_prefix_caching {
                let r = self.slots[slot]
                    .as_mut()
                    .expect("waiting slot holds a request");
                extend_hashes(&mut r.cold.block_hashes, r.cold.root_hash, &r.tokens, bs);
                for &h in &r.cold.block_hashes {
                    if let Some(b) = self.prefix.get(h) {
                        hit.push(Hit::Gpu(b));
                    } else if let Some(b) = self.host_tier.get(h) {
                        hit.push(Hit::Host(b));
                    } else {
                        break;
                    }
                }
            }
            // The host part is loaded only when that beats recomputing it.
            let num_host = hit.iter().filter(|h| matches!(h, Hit::Host(_))).count();
            let load = num_host > 0 && self.load_pays(num_host);
            if num_host > 0 && !load {
                let first_host = hit
                    .iter()
                    .position(|h| matches!(h, Hit::Host(_)))
                    .unwrap_or(hit.len());
                hit.truncate(first_host);
            }
            let r = self.req(slot);
            let len = r.num_tokens();
            // A whole-prompt hit still recomputes the last token, into a copy of the last
            // cached block (copy-on-write; a host block is loaded into it), so the model
            // produces its logits.
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
            let num_gpu_hits = hit.iter().filter(|h| matches!(h, Hit::Gpu(_))).count();
            let need = total_blocks - num_gpu_hits;
            // Hit blocks that sit on the LRU list stop being available once taken.
            let mut taken = hit
                .iter()
                .filter(|h| matches!(h, Hit::Gpu(b) if self.gpu.is_cached_evictable(*b)))
                .count();
            if let Some(Hit::Gpu(src)) = cow_src {
                taken += usize::from(self.gpu.is_cached_evictable(src));
            }
            let available = self.gpu.num_available() - taken;
            if !self.admissible(available, need) {
                break;
            }

            // Counters: what was asked of the cache, what each tier served, what is
            // recomputed, how the host part was decided.
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
            let mut host_tokens = (hit.len() - num_gpu_hits) * bs;
            if let Some(Hit::Host(_)) = cow_src {
                host_tokens += bs - 1;
            }
            self.counters.prefix_queries_tokens += len as u64;
            self.counters.prefix_hits_tokens += computed as u64;
            self.counters.prefix_hits_host_tokens += host_tokens as u64;
            self.counters.prefix_hits_gpu_tokens += (computed - host_tokens) as u64;
            self.counters.recomputed_tokens += recomputed as u64;
            if num_host > 0 {
                if load {
                    self.counters.host_load_decisions += 1;
                } else {
                    self.counters.host_recompute_decisions += 1;
                }
            }

            self.waiting.remove(&queued);
            for h in &hit {
                if let Hit::Gpu(b) = *h {
                    self.gpu.incref(b);
                }
            }
            if let Some(Hit::Gpu(src)) = cow_src {
                self.gpu.incref(src); // pinned so the copy's own allocation can't evict it
            }
            fresh.clear();
            self.gpu_allocate(need, &mut fresh);
            let handle = self.req(slot).handle;
            let mut r = self.slots[slot]
                .take()
                .expect("waiting slot holds a request");
            r.blocks.clear();
            r.blocks_gen = r.blocks_gen.wrapping_add(1);
            // Hits in chain order; each host hit takes the next fresh block as its target.
            let mut next_fresh = fresh.iter().copied();
            let mut started: Vec<(u32, u32)> = Vec::new();
            for h in &hit {
                match *h {
                    Hit::Gpu(b) => r.blocks.push(b),
                    Hit::Host(hb) => {
                        let g = next_fresh.next().expect("a fresh block per host hit");
                        r.blocks.push(g);
                        started.push((hb, g));
                    }
                }
            }
            let cow_dst = cow_src.and_then(|_| next_fresh.clone().next());
            r.blocks.extend(next_fresh);
            // Leading GPU hits are the cache's; commit registers the loaded blocks.
            r.num_registered_blocks = hit.iter().take_while(|h| matches!(h, Hit::Gpu(_))).count();
            r.num_computed = computed;
            r.cold.computed_before_preemption = 0;
            if !r.cold.admitted_once {
                r.cold.admitted_once = true;
                r.cold.cached_prompt_tokens = computed;
            }
            r.status = Status::Running;
            self.slots[slot] = Some(r);
            match (cow_src, cow_dst) {
                (Some(Hit::Gpu(src)), Some(dst)) => {
                    copies.push(i64::from(src));
                    copies.push(i64::from(dst));
                    self.counters.cow_copies += 1;
                    self.gpu.decref(src);
                }
                (Some(Hit::Host(hb)), Some(dst)) => started.push((hb, dst)),
                _ => {}
            }
            for (hb, g) in started {
                loads.push(i64::from(hb));
                loads.push(i64::from(g));
                self.start_load(hb, g, slot, handle);
            }
            self.running.push(slot);
            sched.push(Scheduled::new(slot, self.req(slot), num_new));
            *budget -= num_new;
        }
    }
}

/// Where one block of a prompt's cached prefix is.
#[derive(Debug, Clone, Copy)]
enum Hit {
    Gpu(u32),
    Host(u32),
}
