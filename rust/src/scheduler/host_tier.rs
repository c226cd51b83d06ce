//! The host-memory tier under the prefix cache.
//!
//! Host blocks for swapping and for caching come from the one host `BlockPool`: a swapped
//! request's blocks are in use (ref 1, no hash), a cached host block holds a prefix hash
//! and sits on the host pool's own LRU list, and a block being written by an offload is in
//! use (ref 1, no hash yet). Swap allocations may evict cached host blocks like offloads do.
//!
//! Offload (write-through of idle blocks): a GPU prefix block whose last holder let go goes
//! onto the GPU LRU list; in the next full `schedule`, before admissions, it is copied to a
//! host block (the plan's `offloads`) unless the host already holds its hash. The GPU block
//! stays cached on the GPU and is pinned until the plan is committed, so the admissions of
//! that step cannot evict (drop) or write it, and the copy may overlap the forward. At commit the host block takes the hash
//! and becomes findable; when the GPU later evicts its own copy nothing is lost.
//!
//! Load: admission looks a prompt's block hashes up on the GPU, then on the host. For the
//! host part it decides load or recompute with the preemption cost model (bytes over the
//! host link vs prefill FLOPs over the compute rate). A load copies the host block into a
//! fresh GPU block of the request (the plan's `loads`, before the forward reads it); the
//! host block is pinned until commit, and the GPU block is registered in the prefix cache
//! only at commit, so no other request reads it before its copy is done.
//!
//! A failed copy (`fail_copies`) drops the host blocks its offloads wrote and ends the
//! requests whose loads failed, returning their blocks; nothing stale is ever served.

use std::collections::HashSet;

use crate::error::{CoreError, CoreResult};
use crate::kv_events::KvEventKind;
use crate::prefix_cache::DigestMap;

use super::Scheduler;

/// One offload in flight: GPU block `gpu` (holding `hash`) copied into host block `host`.
#[derive(Debug, Clone, Copy)]
struct Offload {
    gpu: u32,
    host: u32,
    hash: u128,
}

/// One load in flight: host block `host` (pinned) copied into GPU block `gpu` of the
/// request in `slot` (checked by `handle`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    pub(super) host: u32,
    pub(super) gpu: u32,
    pub(super) slot: usize,
    pub(super) handle: u64,
}

/// The host tier's state: which host block holds which hash, and the copies of the
/// pending plan.
#[derive(Debug, Default)]
pub(super) struct HostTier {
    pub(super) on: bool,
    map: DigestMap<u32>,
    offloads: Vec<Offload>,
    /// Hashes of `offloads`, so one pass never copies a hash twice.
    offloading: DigestMap<()>,
    pub(super) loads: Vec<Load>,
    /// Scratch: GPU LRU entries taken for an offload pass.
    entries: Vec<u32>,
}

impl HostTier {
    pub(super) fn new(on: bool) -> Self {
        HostTier {
            on,
            ..HostTier::default()
        }
    }

    /// The host block that holds `hash`, when the tier is on and a committed copy exists.
    pub(super) fn get(&self, hash: u128) -> Option<u32> {
        if !self.on {
            return None;
        }
        self.map.get(&hash).copied()
    }

    pub(super) fn in_flight(&self) -> bool {
        !self.offloads.is_empty() || !self.loads.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn hashes(&self) -> Vec<u128> {
        self.map.keys().copied().collect()
    }
}

impl Scheduler {
    /// Allocates `n` host blocks (the caller checked `num_available`), forgetting the
    /// hashes of cached host blocks evicted for them.
    pub(super) fn host_allocate(&mut self, n: usize, out: &mut Vec<u32>) {
        let mut ev = std::mem::take(&mut self.evicted_scratch);
        ev.clear();
        let res = self.host.allocate(n, out, &mut ev);
        debug_assert!(res.is_ok());
        for h in ev.drain(..) {
            if self.host_tier.map.remove(&h).is_some() {
                self.prefix.record_event(KvEventKind::HostEvicted, h);
            }
            self.counters.host_evictions += 1;
        }
        self.evicted_scratch = ev;
    }

    /// Whether loading `n` blocks over the host link beats recomputing their tokens.
    pub(super) fn load_pays(&self, n: usize) -> bool {
        let tokens = (n * self.cfg.block_size) as f64;
        let load_s = tokens * self.cfg.kv_bytes_per_token as f64 / self.cfg.load_bytes_per_s;
        let recompute_s = tokens * self.cfg.flops_per_token / self.cfg.prefill_flops_per_s;
        load_s < recompute_s
    }

    /// Pins host block `host` and records its load into GPU block `gpu` of `slot`.
    pub(super) fn start_load(&mut self, host: u32, gpu: u32, slot: usize, handle: u64) {
        self.host.incref(host);
        self.host_tier.loads.push(Load {
            host,
            gpu,
            slot,
            handle,
        });
        self.counters.host_loaded_blocks += 1;
    }

    /// In a full `schedule`, before it admits new work: copies the GPU prefix blocks that
    /// went idle since the last pass (oldest first) to host blocks, as long as host blocks
    /// can be had, and pins them until the copy is done, so the admissions that follow
    /// cannot evict (and drop) what just went idle.
    pub(super) fn schedule_offloads(&mut self, out: &mut Vec<i64>) {
        if !self.host_tier.on {
            return;
        }
        let mut entries = std::mem::take(&mut self.host_tier.entries);
        entries.clear();
        self.gpu.take_lru_entries(&mut entries);
        let mut one = Vec::with_capacity(1);
        for &g in &entries {
            // Stale entries: taken again or evicted since it went idle.
            if !self.gpu.is_cached_evictable(g) {
                continue;
            }
            let Some(h) = self.gpu.hash(g) else { continue };
            if let Some(&hb) = self.host_tier.map.get(&h) {
                self.host.touch(hb);
                continue;
            }
            if self.host_tier.offloading.contains_key(&h) {
                continue;
            }
            if self.host.num_available() == 0 {
                break; // every host block is swapped out or in flight
            }
            one.clear();
            self.host_allocate(1, &mut one);
            let hb = one[0];
            out.push(i64::from(g));
            out.push(i64::from(hb));
            self.host_tier.offloads.push(Offload {
                gpu: g,
                host: hb,
                hash: h,
            });
            self.host_tier.offloading.insert(h, ());
            // Pinned until the copy is done: no allocation of this step can take it.
            self.gpu.incref(g);
            self.counters.host_offloaded_blocks += 1;
        }
        entries.clear();
        self.host_tier.entries = entries;
    }

    /// The pending plan's copies are done (its commit): offloaded host blocks become
    /// findable, loads' host blocks are unpinned.
    pub(super) fn complete_copies(&mut self) {
        let tier = &mut self.host_tier;
        for o in tier.offloads.drain(..) {
            self.gpu.decref(o.gpu);
            if tier.map.contains_key(&o.hash) {
                self.host.decref(o.host); // no hash: back to the free stack
                continue;
            }
            self.host.set_hash(o.host, o.hash);
            tier.map.insert(o.hash, o.host);
            self.host.decref(o.host);
            self.prefix.record_event(KvEventKind::HostStored, o.hash);
        }
        tier.offloading.clear();
        for l in tier.loads.drain(..) {
            self.host.decref(l.host);
        }
    }

    /// The runner could not complete the copies of plan `plan_id` (the latest, not yet
    /// committed): the host blocks its offloads wrote are dropped, and every request that
    /// needed one of its loads is ended (its blocks return; the unregistered GPU blocks the
    /// loads wrote go back to the free stack). Returns the ended requests' ids. The plan
    /// stays pending: commit it as usual (the ended requests' rows are skipped).
    pub fn fail_copies(&mut self, plan_id: u64) -> CoreResult<Vec<String>> {
        match &self.pending {
            Some(p) if p.plan_id == plan_id => {}
            _ => {
                return Err(CoreError::StalePlan {
                    msg: format!("plan {plan_id} is not the latest uncommitted plan"),
                })
            }
        }
        let tier = &mut self.host_tier;
        for o in tier.offloads.drain(..) {
            self.gpu.decref(o.gpu);
            self.host.decref(o.host);
            self.counters.host_copy_failures += 1;
        }
        tier.offloading.clear();
        let mut slots = Vec::new();
        let mut seen = HashSet::new();
        for l in tier.loads.drain(..) {
            self.host.decref(l.host);
            self.counters.host_copy_failures += 1;
            let live = self.slots[l.slot]
                .as_ref()
                .is_some_and(|r| r.handle == l.handle);
            if live && seen.insert(l.slot) {
                slots.push(l.slot);
            }
        }
        let mut ids = Vec::with_capacity(slots.len());
        for slot in slots {
            if let Some(r) = &self.slots[slot] {
                ids.push(r.cold.id.clone());
            }
            self.remove(slot, "copy_failed", true);
            self.counters.host_copy_failed_requests += 1;
        }
        if !ids.is_empty() {
            let slots = &self.slots;
            self.running.retain(|&s| slots[s].is_some());
            self.steady.committed = false;
            self.steady.intact = false;
        }
        Ok(ids)
    }

    /// Every block hash cached now in each tier (GPU, host), as of the KV event `seq`.
    pub fn kv_snapshot(&self) -> (u64, Vec<u128>, Vec<u128>) {
        let (seq, gpu) = self.prefix.snapshot();
        (seq, gpu, self.host_tier.hashes())
    }

    /// The host tier's consistency: every hashed host block is the one the host map names,
    /// copies in flight hold what they claim. The owners get one per in-flight host block
    /// and one per GPU block an offload pins.
    pub(super) fn check_host_tier(
        &self,
        gpu_owners: &mut [u32],
        host_owners: &mut [u32],
    ) -> CoreResult<()> {
        let broken = |m: String| Err(CoreError::Invariant(format!("host tier: {m}")));
        let tier = &self.host_tier;
        for o in &tier.offloads {
            let Some(c) = host_owners.get_mut(o.host as usize) else {
                return broken(format!("offload to bad host block {}", o.host));
            };
            *c += 1;
            if self.host.hash(o.host).is_some() {
                return broken(format!("host block {} is findable while written", o.host));
            }
            match gpu_owners.get_mut(o.gpu as usize) {
                Some(c) => *c += 1, // the offload's pin
                None => return broken(format!("offload from bad GPU block {}", o.gpu)),
            }
            if self.gpu.ref_count(o.gpu) == 0 || self.gpu.hash(o.gpu) != Some(o.hash) {
                return broken(format!(
                    "GPU block {} was reused while being offloaded",
                    o.gpu
                ));
            }
        }
        for l in &tier.loads {
            let Some(c) = host_owners.get_mut(l.host as usize) else {
                return broken(format!("load from bad host block {}", l.host));
            };
            *c += 1;
            if self.host.hash(l.host).is_none() {
                return broken(format!("load from uncached host block {}", l.host));
            }
            if self.gpu.hash(l.gpu).is_some() {
                return broken(format!("GPU block {} is findable while loading", l.gpu));
            }
            if let Some(r) = self.slots[l.slot].as_ref().filter(|r| r.handle == l.handle) {
                if !r.blocks.contains(&l.gpu) {
                    return broken(format!("load target {} not held by its request", l.gpu));
                }
            }
        }
        let mut hashed = 0;
        for b in 0..self.host.num_blocks() as u32 {
            if let Some(h) = self.host.hash(b) {
                hashed += 1;
                if tier.map.get(&h) != Some(&b) {
                    return broken(format!("host block {b} holds a hash the map does not name"));
                }
            }
        }
        if hashed != tier.len() {
            return broken(format!(
                "host map has {} entries, {hashed} hashed blocks",
                tier.len()
            ));
        }
        if !tier.on && hashed > 0 {
            return broken("host blocks are cached with the tier off".into());
        }
        Ok(())
    }
}
