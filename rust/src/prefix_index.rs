//! The router's global prefix index: block hash -> the replicas whose prefix cache holds
//! it, fed by each replica's KV events. A hash maps to a bit set of replica slots, so a
//! lookup walks the prompt's hash chain once for all replicas and stops as soon as no
//! replica holds the next block. Each tier of a replica's cache (GPU, host) has its own
//! map, so a lookup tells how much of a prefix is on the GPU and how much more only on
//! the host. Memory is bounded: each replica may hold at most `max_blocks_per_replica`
//! entries per tier (stores past that are counted and dropped).

use std::collections::HashMap;

use thiserror::Error;

use crate::prefix_cache::DigestMap;

/// Replica slots are the bits of a u128.
pub const MAX_REPLICAS: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("replica: the index holds at most {MAX_REPLICAS} replicas")]
    TooManyReplicas,
    #[error("replica: {0:?} is not in the index")]
    UnknownReplica(String),
}

/// A tier of a replica's prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Gpu = 0,
    Host = 1,
}

#[derive(Debug, Clone)]
struct Replica {
    name: String,
    /// Entries per tier.
    blocks: [usize; 2],
    dropped: u64,
}

#[derive(Debug)]
pub struct PrefixIndex {
    /// Per tier: hash -> bit set of the replicas holding it there.
    maps: [DigestMap<u128>; 2],
    slots: Vec<Option<Replica>>,
    by_name: HashMap<String, usize>,
    max_blocks_per_replica: usize,
}

impl PrefixIndex {
    pub fn new(max_blocks_per_replica: usize) -> Self {
        PrefixIndex {
            maps: [DigestMap::default(), DigestMap::default()],
            slots: Vec::new(),
            by_name: HashMap::new(),
            max_blocks_per_replica,
        }
    }

    /// Registers a replica (no-op when known) and returns its slot.
    pub fn add_replica(&mut self, name: &str) -> Result<usize, IndexError> {
        if let Some(&s) = self.by_name.get(name) {
            return Ok(s);
        }
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.slots.len() < MAX_REPLICAS => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => return Err(IndexError::TooManyReplicas),
        };
        self.slots[slot] = Some(Replica {
            name: name.to_string(),
            blocks: [0, 0],
            dropped: 0,
        });
        self.by_name.insert(name.to_string(), slot);
        Ok(slot)
    }

    fn slot(&self, name: &str) -> Result<usize, IndexError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| IndexError::UnknownReplica(name.to_string()))
    }

    fn replica_mut(&mut self, slot: usize) -> &mut Replica {
        match self.slots.get_mut(slot) {
            Some(Some(r)) => r,
            // by_name and slots change together, so a named slot is always occupied
            _ => unreachable_slot(),
        }
    }

    /// Records that `name` caches `hashes` on the GPU; returns how many were new for it.
    pub fn store(&mut self, name: &str, hashes: &[u128]) -> Result<usize, IndexError> {
        self.store_in(Tier::Gpu, name, hashes)
    }

    /// Records that `name` no longer caches `hashes` on the GPU.
    pub fn evict(&mut self, name: &str, hashes: &[u128]) -> Result<usize, IndexError> {
        self.evict_from(Tier::Gpu, name, hashes)
    }

    /// Records that `name` caches `hashes` in `tier`; returns how many were new there.
    pub fn store_in(
        &mut self,
        tier: Tier,
        name: &str,
        hashes: &[u128],
    ) -> Result<usize, IndexError> {
        let slot = self.slot(name)?;
        let t = tier as usize;
        let bit = 1u128 << slot;
        let cap = self.max_blocks_per_replica;
        let mut blocks = self.replica_mut(slot).blocks[t];
        let (mut added, mut dropped) = (0, 0);
        let map = &mut self.maps[t];
        for &h in hashes {
            if blocks >= cap {
                if map.get(&h).is_none_or(|m| m & bit == 0) {
                    dropped += 1;
                }
                continue;
            }
            let m = map.entry(h).or_insert(0);
            if *m & bit == 0 {
                *m |= bit;
                blocks += 1;
                added += 1;
            }
        }
        let r = self.replica_mut(slot);
        r.blocks[t] = blocks;
        r.dropped += dropped;
        Ok(added)
    }

    /// Records that `name` no longer caches `hashes` in `tier`.
    pub fn evict_from(
        &mut self,
        tier: Tier,
        name: &str,
        hashes: &[u128],
    ) -> Result<usize, IndexError> {
        let slot = self.slot(name)?;
        let t = tier as usize;
        let bit = 1u128 << slot;
        let mut removed = 0;
        let map = &mut self.maps[t];
        for h in hashes {
            if let Some(m) = map.get_mut(h) {
                if *m & bit != 0 {
                    *m &= !bit;
                    removed += 1;
                    if *m == 0 {
                        map.remove(h);
                    }
                }
            }
        }
        self.replica_mut(slot).blocks[t] -= removed;
        Ok(removed)
    }

    /// Forgets everything `name` caches in every tier (before a snapshot replaces it);
    /// keeps the slot.
    pub fn clear_replica(&mut self, name: &str) -> Result<(), IndexError> {
        let slot = self.slot(name)?;
        let keep = !(1u128 << slot);
        for t in 0..2 {
            if self.replica_mut(slot).blocks[t] > 0 {
                self.maps[t].retain(|_, m| {
                    *m &= keep;
                    *m != 0
                });
            }
        }
        let r = self.replica_mut(slot);
        r.blocks = [0, 0];
        Ok(())
    }

    /// Removes a replica and everything it caches in one call; false when unknown.
    pub fn remove_replica(&mut self, name: &str) -> bool {
        let Ok(slot) = self.slot(name) else {
            return false;
        };
        // clear_replica cannot fail for a known name
        let _ = self.clear_replica(name);
        self.slots[slot] = None;
        self.by_name.remove(name);
        true
    }

    /// For every replica, how many leading blocks of the chain `hashes` it holds on the GPU.
    pub fn longest_prefixes(&self, hashes: &[u128]) -> Vec<(&str, usize)> {
        let depth = self.depths(hashes, |h| self.maps[0].get(h).copied().unwrap_or(0));
        self.named(&depth, hashes.len())
    }

    /// For every replica: (leading blocks of `hashes` on its GPU, leading blocks it holds
    /// in either tier). The second is never smaller; the difference is what the replica
    /// would load from host memory (or recompute, its choice).
    pub fn longest_prefixes_by_tier(&self, hashes: &[u128]) -> Vec<(&str, usize, usize)> {
        let get = |t: usize, h: &u128| self.maps[t].get(h).copied().unwrap_or(0);
        let gpu = self.depths(hashes, |h| get(0, h));
        let any = self.depths(hashes, |h| get(0, h) | get(1, h));
        let gpu = self.named(&gpu, hashes.len());
        let any = self.named(&any, hashes.len());
        gpu.into_iter()
            .zip(any)
            .map(|((n, g), (_, a))| (n, g, a))
            .collect()
    }

    /// Per slot, the index of the first block of `hashes` it lacks (usize::MAX: none),
    /// where `held(h)` is the bit set of replicas holding `h`.
    fn depths(&self, hashes: &[u128], held: impl Fn(&u128) -> u128) -> [usize; MAX_REPLICAS] {
        let mut depth = [usize::MAX; MAX_REPLICAS];
        let mut alive: u128 = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_some())
            .fold(0, |m, (i, _)| m | (1u128 << i));
        for (i, h) in hashes.iter().enumerate() {
            if alive == 0 {
                break;
            }
            let m = held(h);
            let mut gone = alive & !m;
            while gone != 0 {
                let s = gone.trailing_zeros() as usize;
                depth[s] = i;
                gone &= gone - 1;
            }
            alive &= m;
        }
        depth
    }

    /// (replica name, depth) for every replica, in slot order.
    fn named(&self, depth: &[usize; MAX_REPLICAS], full: usize) -> Vec<(&str, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref().map(|r| {
                    let d = if depth[i] == usize::MAX {
                        full
                    } else {
                        depth[i]
                    };
                    (r.name.as_str(), d)
                })
            })
            .collect()
    }

    pub fn holds(&self, name: &str, hash: u128) -> bool {
        match self.slot(name) {
            Ok(s) => self.maps[0]
                .get(&hash)
                .is_some_and(|m| m & (1u128 << s) != 0),
            Err(_) => false,
        }
    }

    /// Distinct hashes indexed on the GPU tier.
    pub fn len(&self) -> usize {
        self.maps[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps[0].is_empty()
    }

    /// Distinct hashes indexed on the host tier.
    pub fn host_len(&self) -> usize {
        self.maps[1].len()
    }

    /// (GPU blocks indexed, stores dropped at the cap in either tier) for a replica.
    pub fn replica_stats(&self, name: &str) -> Result<(usize, u64), IndexError> {
        let slot = self.slot(name)?;
        match &self.slots[slot] {
            Some(r) => Ok((r.blocks[0], r.dropped)),
            None => Err(IndexError::UnknownReplica(name.to_string())),
        }
    }

    /// Host-tier blocks indexed for a replica.
    pub fn replica_host_blocks(&self, name: &str) -> Result<usize, IndexError> {
        let slot = self.slot(name)?;
        match &self.slots[slot] {
            Some(r) => Ok(r.blocks[1]),
            None => Err(IndexError::UnknownReplica(name.to_string())),
        }
    }

    pub fn replicas(&self) -> Vec<&str> {
        self.slots
            .iter()
            .flatten()
            .map(|r| r.name.as_str())
            .collect()
    }
}

#[cold]
fn unreachable_slot() -> ! {
    unreachable!("prefix index: a named replica's slot is empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_per_replica() {
        let mut ix = PrefixIndex::new(100);
        ix.add_replica("a").unwrap();
        ix.add_replica("b").unwrap();
        ix.add_replica("c").unwrap();
        ix.store("a", &[1, 2, 3]).unwrap();
        ix.store("b", &[1, 3]).unwrap();
        let got = ix.longest_prefixes(&[1, 2, 3, 4]);
        assert_eq!(got, vec![("a", 3), ("b", 1), ("c", 0)]);
        ix.evict("a", &[2]).unwrap();
        assert_eq!(ix.longest_prefixes(&[1, 2])[0], ("a", 1));
        assert!(ix.remove_replica("b"));
        assert!(!ix.holds("b", 1));
        assert_eq!(ix.len(), 2);
        assert_eq!(
            ix.store("b", &[1]),
            Err(IndexError::UnknownReplica("b".into()))
        );
    }

    #[test]
    fn tiers_are_tracked_apart() {
        let mut ix = PrefixIndex::new(100);
        ix.add_replica("a").unwrap();
        ix.add_replica("b").unwrap();
        ix.store("a", &[1, 2]).unwrap();
        ix.store_in(Tier::Host, "a", &[2, 3, 4]).unwrap();
        ix.store_in(Tier::Host, "b", &[1, 2]).unwrap();
        let got = ix.longest_prefixes_by_tier(&[1, 2, 3, 4, 5]);
        assert_eq!(got, vec![("a", 2, 4), ("b", 0, 2)]);
        assert_eq!(ix.longest_prefixes(&[1, 2, 3])[0], ("a", 2));
        ix.evict("a", &[1]).unwrap(); // GPU lost it, host never had it: nothing left
        assert_eq!(ix.longest_prefixes_by_tier(&[1, 2])[0], ("a", 0, 0));
        assert_eq!((ix.len(), ix.host_len()), (1, 4));
        assert_eq!(ix.replica_host_blocks("a").unwrap(), 3);
        ix.clear_replica("a").unwrap();
        assert_eq!((ix.len(), ix.host_len()), (0, 2));
        assert!(ix.remove_replica("b"));
        assert_eq!(ix.host_len(), 0);
    }

    #[test]
    fn cap_bounds_each_replica() {
        let mut ix = PrefixIndex::new(2);
        ix.add_replica("a").unwrap();
        assert_eq!(ix.store("a", &[1, 2, 3, 1]).unwrap(), 2);
        assert_eq!(ix.replica_stats("a").unwrap(), (2, 1));
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn slots_are_reused_and_limited() {
        let mut ix = PrefixIndex::new(10);
        for i in 0..MAX_REPLICAS {
            ix.add_replica(&format!("r{i}")).unwrap();
        }
        assert_eq!(ix.add_replica("x"), Err(IndexError::TooManyReplicas));
        ix.remove_replica("r5");
        assert_eq!(ix.add_replica("x"), Ok(5));
    }
}
