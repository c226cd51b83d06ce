//! Growing a running request's blocks, and preempting one (swap or recompute) when the
//! pool runs short.

use crate::config::PreemptionMode;
use crate::request::{Request, Status};

use super::{key, Scheduler};

impl Scheduler {
    /// Allocates `n` more GPU blocks for a running request (caller checked availability).
    pub(super) fn grow(&mut self, slot: usize, n: usize) {
        if n == 0 {
            return;
        }
        let mut new_blocks = Vec::with_capacity(n);
        self.gpu_allocate(n, &mut new_blocks);
        self.req_mut(slot).blocks.extend_from_slice(&new_blocks);
    }

    /// Allocates `n` GPU blocks into `out` (caller checked availability), forgetting the
    /// prefix hashes of cached blocks evicted for them.
    pub(super) fn gpu_allocate(&mut self, n: usize, out: &mut Vec<u32>) {
        let mut ev = std::mem::take(&mut self.evicted_scratch);
        ev.clear();
        let res = self.gpu.allocate(n, out, &mut ev);
        debug_assert!(res.is_ok());
        for h in ev.drain(..) {
            self.prefix.on_evicted(h);
        }
        self.evicted_scratch = ev;
    }

    /// The running request to preempt: lowest priority (largest value), latest arrival.
    pub(super) fn pick_victim(&self) -> usize {
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

    pub(super) fn preempt(&mut self, slot: usize, swap_out: &mut Vec<i64>) {
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
            self.host_allocate(n, &mut host_blocks);
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
}
