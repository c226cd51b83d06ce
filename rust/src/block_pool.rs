//! A fixed pool of KV blocks. Each block is in exactly one state:
//! free (ref 0, no hash, on the free stack), in use (ref > 0), or cached-evictable
//! (ref 0, holds a prefix hash, on an intrusive LRU list). Allocation pops the free stack
//! first and evicts the least-recently-used cached block second; both are O(1).

use crate::error::{CoreError, CoreResult};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    hash: Option<u128>,
    // LRU links; meaningful only while the block is cached-evictable.
    prev: u32,
    next: u32,
    in_lru: bool,
}

#[derive(Debug, Clone)]
pub struct BlockPool {
    name: &'static str,
    blocks: Vec<Block>,
    free: Vec<u32>,
    lru_head: u32, // least recently used: evicted first
    lru_tail: u32,
    num_cached: usize,
    num_used: usize,
    evictions: u64,
    /// Blocks that went onto the LRU list since the last `take_lru_entries`, when tracked
    /// (the host tier offloads them).
    lru_entries: Option<Vec<u32>>,
}

/// What an allocation evicted: the prefix hash the caller must forget.
pub type Evicted = u128;

impl BlockPool {
    pub fn new(name: &'static str, num_blocks: usize) -> Self {
        let blocks = vec![
            Block {
                ref_cnt: 0,
                hash: None,
                prev: NIL,
                next: NIL,
                in_lru: false
            };
            num_blocks
        ];
        // Reversed so that block 0 is handed out first (easier to read in tests).
        let free = (0..num_blocks as u32).rev().collect();
        BlockPool {
            name,
            blocks,
            free,
            lru_head: NIL,
            lru_tail: NIL,
            num_cached: 0,
            num_used: 0,
            evictions: 0,
            lru_entries: None,
        }
    }

    /// Starts recording the blocks that go onto the LRU list (for `take_lru_entries`).
    pub fn track_lru_entries(&mut self) {
        self.lru_entries.get_or_insert_with(Vec::new);
    }

    /// Whether blocks went onto the LRU list since the last `take_lru_entries`.
    pub fn has_lru_entries(&self) -> bool {
        self.lru_entries.as_ref().is_some_and(|v| !v.is_empty())
    }

    /// Moves the recorded LRU entries (oldest first) into `out`. An entry may be stale: the
    /// block may have been taken again or evicted since.
    pub fn take_lru_entries(&mut self, out: &mut Vec<u32>) {
        if let Some(v) = &mut self.lru_entries {
            out.append(v);
        }
    }

    /// Marks a cached block as just used (moves it to the LRU list's most recent end).
    pub fn touch(&mut self, block: u32) {
        if self.blocks[block as usize].in_lru {
            self.lru_remove(block);
            self.lru_push_tail(block);
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }
    pub fn num_used(&self) -> usize {
        self.num_used
    }
    /// Blocks an allocation can obtain: free plus evictable.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.num_cached
    }
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
    pub fn ref_count(&self, block: u32) -> u32 {
        self.blocks[block as usize].ref_cnt
    }
    pub fn hash(&self, block: u32) -> Option<u128> {
        self.blocks[block as usize].hash
    }
    pub fn is_cached_evictable(&self, block: u32) -> bool {
        self.blocks[block as usize].in_lru
    }

    /// Allocates `n` blocks (ref 1 each) into `out`, pushing the hashes of evicted cached
    /// blocks to `evicted`. Asking for more than `num_available()` changes nothing.
    pub fn allocate(
        &mut self,
        n: usize,
        out: &mut Vec<u32>,
        evicted: &mut Vec<Evicted>,
    ) -> CoreResult<()> {
        if n > self.num_available() {
            return Err(CoreError::OutOfBlocks {
                pool: self.name,
                requested: n,
                available: self.num_available(),
            });
        }
        out.reserve(n);
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    let id = self.lru_head;
                    self.lru_remove(id);
                    let b = &mut self.blocks[id as usize];
                    if let Some(h) = b.hash.take() {
                        evicted.push(h);
                    }
                    self.evictions += 1;
                    id
                }
            };
            let b = &mut self.blocks[id as usize];
            b.ref_cnt = 1;
            self.num_used += 1;
            out.push(id);
        }
        Ok(())
    }

    /// Takes one more reference on an in-use or cached block (a prefix-cache hit).
    pub fn incref(&mut self, block: u32) {
        if self.blocks[block as usize].in_lru {
            self.lru_remove(block);
        }
        let b = &mut self.blocks[block as usize];
        if b.ref_cnt == 0 {
            self.num_used += 1;
        }
        b.ref_cnt += 1;
    }

    /// Drops one reference. At zero a block with a hash becomes the most recently used
    /// cached block; one without goes back to the free stack.
    pub fn decref(&mut self, block: u32) {
        let b = &mut self.blocks[block as usize];
        debug_assert!(b.ref_cnt > 0, "decref of a block with ref 0");
        if b.ref_cnt == 0 {
            return;
        }
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            self.num_used -= 1;
            if b.hash.is_some() {
                self.lru_push_tail(block);
                if let Some(v) = &mut self.lru_entries {
                    v.push(block);
                }
            } else {
                self.free.push(block);
            }
        }
    }

    /// Marks an in-use block as holding the full-block prefix `hash`.
    pub fn set_hash(&mut self, block: u32, hash: u128) {
        self.blocks[block as usize].hash = Some(hash);
    }

    fn lru_remove(&mut self, id: u32) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.in_lru = false;
        self.num_cached -= 1;
    }

    fn lru_push_tail(&mut self, id: u32) {
        let tail = self.lru_tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NIL;
            b.in_lru = true;
        }
        if tail == NIL {
            self.lru_head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.lru_tail = id;
        self.num_cached += 1;
    }

    /// Cached blocks from least to most recently used (tests and invariant checks).
    pub fn lru_order(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_cached);
        let mut cur = self.lru_head;
        while cur != NIL && out.len() <= self.blocks.len() {
            out.push(cur);
            cur = self.blocks[cur as usize].next;
        }
        out
    }

    /// Checks the pool's own bookkeeping; `owners[b]` is how many sequences hold block b.
    pub fn check(&self, owners: &[u32]) -> CoreResult<()> {
        let n = self.blocks.len();
        let bad = |m: String| Err(CoreError::Invariant(format!("{} pool: {}", self.name, m)));
        if self.free.len() + self.num_used + self.num_cached != n {
            return bad(format!(
                "free {} + used {} + cached {} != total {}",
                self.free.len(),
                self.num_used,
                self.num_cached,
                n
            ));
        }
        let mut seen = vec![0u8; n];
        for &f in &self.free {
            let b = &self.blocks[f as usize];
            if b.ref_cnt != 0 || b.hash.is_some() || b.in_lru {
                return bad(format!("free block {f} has ref {} or a hash", b.ref_cnt));
            }
            seen[f as usize] += 1;
        }
        let lru = self.lru_order();
        if lru.len() != self.num_cached {
            return bad(format!(
                "LRU list has {} blocks, counter {}",
                lru.len(),
                self.num_cached
            ));
        }
        let mut prev = NIL;
        for &c in &lru {
            let b = &self.blocks[c as usize];
            if b.ref_cnt != 0 || b.hash.is_none() || !b.in_lru || b.prev != prev {
                return bad(format!("cached block {c} is inconsistent"));
            }
            seen[c as usize] += 1;
            prev = c;
        }
        let mut used = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.ref_cnt > 0 {
                used += 1;
                seen[i] += 1;
                if b.in_lru {
                    return bad(format!("in-use block {i} is on the LRU list"));
                }
            }
            if seen[i] != 1 {
                return bad(format!("block {i} is in {} states", seen[i]));
            }
            if owners.get(i).copied().unwrap_or(0) != b.ref_cnt {
                return bad(format!(
                    "block {i} has ref count {} but {} owners",
                    b.ref_cnt,
                    owners.get(i).copied().unwrap_or(0)
                ));
            }
        }
        if used != self.num_used {
            return bad(format!("{used} blocks in use, counter {}", self.num_used));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_and_lru_eviction_order() {
        let mut p = BlockPool::new("gpu", 4);
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        p.allocate(4, &mut out, &mut ev).unwrap();
        assert_eq!(out, vec![0, 1, 2, 3]);
        assert!(p.allocate(1, &mut out, &mut ev).is_err());
        assert_eq!(out.len(), 4, "a failed allocation changes nothing");
        p.set_hash(1, 11);
        p.set_hash(2, 22);
        p.decref(2); // cached, least recently used
        p.decref(1); // cached, most recently used
        p.decref(3); // free (no hash)
        assert_eq!((p.num_free(), p.num_cached(), p.num_used()), (1, 2, 1));
        assert_eq!(p.lru_order(), vec![2, 1]);
        let mut out2 = Vec::new();
        p.allocate(2, &mut out2, &mut ev).unwrap();
        assert_eq!(out2, vec![3, 2], "free first, then the LRU cached block");
        assert_eq!(ev, vec![22]);
        assert_eq!(p.evictions(), 1);
        p.incref(1); // hit on the cached block takes it off the LRU list
        assert_eq!(p.num_cached(), 0);
        let owners = [1, 1, 1, 1];
        p.check(&owners).unwrap();
    }
}
