//! Whole-core consistency checks, used by tests after every operation.

use super::{key, Scheduler};
use crate::error::{CoreError, CoreResult};
use crate::recent_tokens::RECENT_CAP;
use crate::request::Status;

fn broken<T>(msg: String) -> CoreResult<T> {
    Err(CoreError::Invariant(msg))
}

impl Scheduler {
    /// Checks block accounting, ownership, the prefix map, the host tier and the queues.
    pub fn check_invariants(&self) -> CoreResult<()> {
        let cfg = &self.cfg;
        let mut gpu_owners = vec![0u32; cfg.num_gpu_blocks];
        let mut host_owners = vec![0u32; cfg.num_host_blocks];
        let (mut n_run, mut n_wait, mut n_swap) = (0, 0, 0);
        for (slot, r) in self.slots.iter().enumerate() {
            let Some(r) = r else { continue };
            if self.by_id.get(&r.cold.id) != Some(&slot) {
                return broken(format!("request {:?} is not indexed by its id", r.cold.id));
            }
            let mut mine = r.blocks.clone();
            mine.sort_unstable();
            if mine.windows(2).any(|w| w[0] == w[1]) {
                return broken(format!("request {:?} holds a block twice", r.cold.id));
            }
            for &b in &r.blocks {
                match gpu_owners.get_mut(b as usize) {
                    Some(o) => *o += 1,
                    None => return broken(format!("request {:?} holds bad block {b}", r.cold.id)),
                }
            }
            for &b in &r.cold.host_blocks {
                match host_owners.get_mut(b as usize) {
                    Some(o) => *o += 1,
                    None => {
                        return broken(format!("request {:?} holds bad host block {b}", r.cold.id))
                    }
                }
            }
            // Recent tokens: fewer than a full row, none once preempted, and the newest
            // token (wherever it sits) is the cached `last_token` fed to the next decode.
            if r.num_recent >= RECENT_CAP || (r.status != Status::Running && r.num_recent != 0) {
                return broken(format!(
                    "request {:?} has {} unmoved tokens",
                    r.cold.id, r.num_recent
                ));
            }
            let newest = match self.recent.pending(r, slot).last() {
                Some(&t) => Some(t),
                None => r.tokens.last().copied(),
            };
            if newest != Some(r.last_token) {
                return broken(format!("request {:?}: last_token is stale", r.cold.id));
            }
            if r.num_computed > r.num_tokens() || r.num_tokens() >= cfg.max_model_len {
                return broken(format!("request {:?} has inconsistent lengths", r.cold.id));
            }
            let key = key(r, slot);
            match r.status {
                Status::Running => {
                    n_run += 1;
                    if !self.running.contains(&slot) {
                        return broken(format!(
                            "running request {:?} not in running list",
                            r.cold.id
                        ));
                    }
                    let lo = cfg.blocks_for(r.num_computed);
                    let hi = cfg.blocks_for(r.num_tokens());
                    if r.blocks.len() < lo || r.blocks.len() > hi || !r.cold.host_blocks.is_empty()
                    {
                        return broken(format!(
                            "running request {:?} holds {} blocks for {} computed of {} tokens",
                            r.cold.id,
                            r.blocks.len(),
                            r.num_computed,
                            r.num_tokens()
                        ));
                    }
                }
                Status::Waiting => {
                    n_wait += 1;
                    if !self.waiting.contains(&key) {
                        return broken(format!("waiting request {:?} not queued", r.cold.id));
                    }
                    if !r.blocks.is_empty() || !r.cold.host_blocks.is_empty() || r.num_computed != 0
                    {
                        return broken(format!("waiting request {:?} holds blocks", r.cold.id));
                    }
                }
                Status::Swapped => {
                    n_swap += 1;
                    if !self.swapped.contains(&key) {
                        return broken(format!("swapped request {:?} not queued", r.cold.id));
                    }
                    if !r.blocks.is_empty()
                        || r.cold.host_blocks.len() != cfg.blocks_for(r.num_computed)
                    {
                        return broken(format!("swapped request {:?} has wrong blocks", r.cold.id));
                    }
                }
            }
        }
        if n_run != self.running.len()
            || n_wait != self.waiting.len()
            || n_swap != self.swapped.len()
        {
            return broken(format!(
                "queue sizes (running {}, waiting {}, swapped {}) != requests in each state ({n_run}, {n_wait}, {n_swap})",
                self.running.len(),
                self.waiting.len(),
                self.swapped.len()
            ));
        }
        if self.by_id.len() != n_run + n_wait + n_swap {
            return broken("id index holds dead requests".into());
        }
        if n_run > cfg.max_num_seqs {
            return broken(format!(
                "{n_run} running > max_num_seqs {}",
                cfg.max_num_seqs
            ));
        }
        self.check_host_tier(&mut gpu_owners, &mut host_owners)?;
        self.gpu.check(&gpu_owners)?;
        self.host.check(&host_owners)?;
        for (b, &o) in gpu_owners.iter().enumerate() {
            if o > 1 && self.gpu.hash(b as u32).is_none() {
                return broken(format!(
                    "block {b} has {o} owners but is not a prefix-cache block"
                ));
            }
        }
        let mut hashed = 0;
        for b in 0..cfg.num_gpu_blocks as u32 {
            if let Some(h) = self.gpu.hash(b) {
                hashed += 1;
                if self.prefix.get(h) != Some(b) {
                    return broken(format!(
                        "block {b} has a hash the prefix map does not point at it"
                    ));
                }
            }
        }
        if hashed != self.prefix.len() {
            return broken(format!(
                "prefix map has {} entries, {hashed} hashed blocks",
                self.prefix.len()
            ));
        }
        for (h, b) in self.prefix.iter() {
            if self.gpu.hash(b) != Some(h) {
                return broken(format!(
                    "prefix map points at block {b} which holds another hash"
                ));
            }
        }
        Ok(())
    }
}
