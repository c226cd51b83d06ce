//! Prefix cache: a full block's identity is a 128-bit xxh3 digest chaining the parent
//! block's digest, the block's token ids and (through the root) an optional salt, so a
//! digest names the whole prefix up to and including that block and tenants with
//! different salts never share blocks. The map goes from digest to the GPU block that
//! holds it. A bounded record of recently evicted digests lets the scheduler count tokens
//! recomputed because their blocks had been evicted.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::kv_events::{KvEventBatch, KvEventKind, KvEventLog};

/// Keys are already uniform 128-bit digests: hashing them again would waste time.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub type DigestMap<V> = HashMap<u128, V, BuildHasherDefault<DigestHasher>>;

/// Root of a request's chain: distinct per salt, so salted prefixes never collide.
pub fn root_hash(salt: Option<&str>) -> u128 {
    match salt {
        None => 0,
        Some(s) => {
            let mut h = Xxh3::new();
            h.update(b"kvserve-salt\0");
            h.update(s.as_bytes());
            h.digest128() | 1 // never equal to the unsalted root
        }
    }
}

/// Digest of one full block given its parent's digest.
pub fn block_hash(parent: u128, tokens: &[i64]) -> u128 {
    // Blocks of up to 64 tokens hash from the stack (no allocation per block).
    const INLINE: usize = 16 + 64 * 8;
    let len = 16 + tokens.len() * 8;
    let mut inline = [0u8; INLINE];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= INLINE {
        &mut inline[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..16].copy_from_slice(&parent.to_le_bytes());
    for (dst, t) in buf[16..].chunks_exact_mut(8).zip(tokens) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
    xxh3_128(buf)
}

/// The digests of every full block of `tokens` under `salt`: the chain the cache keys
/// blocks by, for routers that must name a prompt's blocks as a replica does.
pub fn block_hashes(tokens: &[i64], block_size: usize, salt: Option<&str>) -> Vec<u128> {
    let mut hashes = Vec::with_capacity(tokens.len() / block_size.max(1));
    if block_size > 0 {
        extend_hashes(&mut hashes, root_hash(salt), tokens, block_size);
    }
    hashes
}

/// Extends `hashes` (the digests of `tokens`' leading full blocks) to cover every full
/// block of `tokens`. Cheap when nothing is new.
pub fn extend_hashes(hashes: &mut Vec<u128>, root: u128, tokens: &[i64], block_size: usize) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = if i == 0 { root } else { hashes[i - 1] };
        hashes.push(block_hash(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

#[derive(Debug, Default)]
pub struct PrefixCache {
    map: DigestMap<u32>,
    // Recently evicted digests (value: insertion serial), bounded FIFO.
    evicted: DigestMap<u64>,
    evicted_fifo: VecDeque<(u128, u64)>,
    evicted_cap: usize,
    serial: u64,
    events: KvEventLog,
}

impl PrefixCache {
    /// `num_blocks` bounds the map (one entry per cached block): sizing it up front keeps
    /// rehashing (a multi-millisecond stall at large pools) off the step path.
    pub fn new(num_blocks: usize, evicted_cap: usize) -> Self {
        let mut map = DigestMap::default();
        map.reserve(num_blocks);
        PrefixCache {
            map,
            evicted_cap,
            ..Default::default()
        }
    }

    pub fn get(&self, hash: u128) -> Option<u32> {
        self.map.get(&hash).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Registers `block` as holding `hash`; false when another block already does.
    pub fn insert(&mut self, hash: u128, block: u32) -> bool {
        match self.map.entry(hash) {
            Entry::Occupied(_) => return false,
            Entry::Vacant(v) => {
                v.insert(block);
            }
        }
        if !self.evicted.is_empty() {
            self.evicted.remove(&hash);
        }
        self.events.record(KvEventKind::Stored, hash);
        true
    }

    /// Forgets an evicted block's digest, remembering that it was evicted.
    pub fn on_evicted(&mut self, hash: u128) {
        if self.map.remove(&hash).is_some() {
            self.events.record(KvEventKind::Evicted, hash);
        }
        if self.evicted_cap == 0 {
            return;
        }
        self.serial += 1;
        self.evicted.insert(hash, self.serial);
        self.evicted_fifo.push_back((hash, self.serial));
        while self.evicted_fifo.len() > self.evicted_cap {
            if let Some((h, s)) = self.evicted_fifo.pop_front() {
                if self.evicted.get(&h) == Some(&s) {
                    self.evicted.remove(&h);
                }
            }
        }
    }

    /// (remembered evicted digests, their FIFO's entries, undrained KV events).
    pub fn record_lens(&self) -> (usize, usize, usize) {
        (
            self.evicted.len(),
            self.evicted_fifo.len(),
            self.events.len(),
        )
    }

    /// Records an event of another tier (the host tier's) in the same log, so one
    /// sequence orders both tiers.
    pub fn record_event(&mut self, kind: KvEventKind, hash: u128) {
        self.events.record(kind, hash);
    }

    /// The sequence number of the latest event.
    pub fn last_event_seq(&self) -> u64 {
        self.events.last_seq()
    }

    pub fn was_evicted(&self, hash: u128) -> bool {
        self.evicted.contains_key(&hash)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u128, u32)> + '_ {
        self.map.iter().map(|(h, b)| (*h, *b))
    }

    /// Records stored/evicted events in a log of at most `capacity` (0: off).
    pub fn set_event_capacity(&mut self, capacity: usize) {
        self.events.set_capacity(capacity);
    }

    /// The events since the last drain (or a resync flag after an overflow).
    pub fn drain_events(&mut self) -> KvEventBatch {
        self.events.drain()
    }

    /// Every digest cached now and the sequence number of the last event it covers (a
    /// reader skips drained events up to it). The log is left as it is, so other readers
    /// of the same drains lose nothing.
    pub fn snapshot(&self) -> (u64, Vec<u128>) {
        (self.events.last_seq(), self.map.keys().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_parent_tokens_and_salt() {
        let a = block_hash(root_hash(None), &[1, 2, 3, 4]);
        assert_eq!(a, block_hash(0, &[1, 2, 3, 4]));
        assert_ne!(a, block_hash(0, &[1, 2, 3, 5]));
        assert_ne!(a, block_hash(root_hash(Some("tenant")), &[1, 2, 3, 4]));
        assert_ne!(root_hash(Some("a")), root_hash(Some("b")));
        let b = block_hash(a, &[5, 6, 7, 8]);
        assert_ne!(b, block_hash(0, &[5, 6, 7, 8]));
        let mut hs = Vec::new();
        extend_hashes(&mut hs, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(hs, vec![a, b]);
    }

    #[test]
    fn block_hashes_is_the_cache_chain() {
        let tokens: Vec<i64> = (0..37).collect();
        let mut hs = Vec::new();
        extend_hashes(&mut hs, root_hash(Some("s")), &tokens, 8);
        assert_eq!(block_hashes(&tokens, 8, Some("s")), hs);
        assert_eq!(hs.len(), 4);
        assert!(block_hashes(&tokens, 0, None).is_empty());
    }

    #[test]
    fn events_follow_inserts_and_evictions() {
        use crate::kv_events::KvEventKind::*;
        let mut pc = PrefixCache::new(8, 0);
        pc.insert(1, 0); // before recording: only in the snapshot
        pc.set_event_capacity(16);
        assert!(pc.insert(2, 1));
        assert!(!pc.insert(2, 3), "a duplicate stores nothing");
        pc.on_evicted(1);
        pc.on_evicted(9); // never cached: no event
        let b = pc.drain_events();
        assert_eq!((b.kinds, b.hashes), (vec![Stored, Evicted], vec![2, 1]));
        let (seq, mut snap) = pc.snapshot();
        snap.sort();
        assert_eq!((seq, snap), (2, vec![2]));
    }

    #[test]
    fn evicted_record_is_bounded_and_cleared_on_reinsert() {
        let mut pc = PrefixCache::new(8, 2);
        assert!(pc.insert(1, 0));
        assert!(!pc.insert(1, 5));
        pc.on_evicted(1);
        assert!(pc.get(1).is_none() && pc.was_evicted(1));
        pc.on_evicted(2);
        pc.on_evicted(3);
        assert!(!pc.was_evicted(1), "oldest record dropped past the cap");
        assert!(pc.insert(3, 7));
        assert!(!pc.was_evicted(3));
    }
}
