//! KV events: what the prefix cache stored and evicted, in order, for routers that keep a
//! global index of every replica's cache. The log is bounded: when it would outgrow its
//! capacity it drops what it holds and flags "resync needed", and the reader takes a
//! snapshot of the whole cache instead. Sequence numbers count every event, recorded or
//! dropped, so a reader can tell a snapshot's place in the stream: a snapshot taken at
//! `last_seq() == S` covers every event up to S, and the reader skips those it drains.

/// What happened to one block hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KvEventKind {
    /// The block is now cached on the GPU.
    Stored = 1,
    /// The block left the GPU (it may still be on the host: see the host kinds).
    Evicted = 2,
    /// The host prefix tier now holds a copy of the block.
    HostStored = 3,
    /// The host prefix tier dropped its copy.
    HostEvicted = 4,
}

/// Events taken out of the log by one `drain`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KvEventBatch {
    /// The log overflowed since the last drain or snapshot: the events are gone and the
    /// reader must take a snapshot.
    pub resync_needed: bool,
    /// Sequence number of `kinds[0]`; event i has `first_seq + i`.
    pub first_seq: u64,
    pub kinds: Vec<KvEventKind>,
    pub hashes: Vec<u128>,
}

#[derive(Debug, Default)]
pub struct KvEventLog {
    capacity: usize, // 0: off, nothing recorded
    last_seq: u64,
    first_seq: u64,
    kinds: Vec<KvEventKind>,
    hashes: Vec<u128>,
    overflowed: bool,
}

impl KvEventLog {
    /// Starts recording (capacity > 0) or stops (0). Whatever was buffered is dropped, so
    /// the reader starts from a snapshot.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.kinds = Vec::new();
        self.hashes = Vec::new();
        self.overflowed = false;
        self.first_seq = self.last_seq + 1;
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events held (not yet drained).
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    /// Sequence number of the latest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn record(&mut self, kind: KvEventKind, hash: u128) {
        if self.capacity == 0 {
            return;
        }
        self.last_seq += 1;
        if self.overflowed {
            return;
        }
        if self.kinds.len() >= self.capacity {
            self.overflowed = true;
            self.kinds = Vec::new();
            self.hashes = Vec::new();
            return;
        }
        if self.kinds.is_empty() {
            self.first_seq = self.last_seq;
        }
        self.kinds.push(kind);
        self.hashes.push(hash);
    }

    pub fn drain(&mut self) -> KvEventBatch {
        let batch = KvEventBatch {
            resync_needed: self.overflowed,
            first_seq: if self.kinds.is_empty() {
                self.last_seq + 1
            } else {
                self.first_seq
            },
            kinds: std::mem::take(&mut self.kinds),
            hashes: std::mem::take(&mut self.hashes),
        };
        self.overflowed = false;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KvEventKind::*;

    #[test]
    fn off_records_nothing() {
        let mut log = KvEventLog::default();
        log.record(Stored, 1);
        assert_eq!(log.last_seq(), 0);
        assert!(log.drain().kinds.is_empty());
    }

    #[test]
    fn drains_in_order_with_consecutive_seqs() {
        let mut log = KvEventLog::default();
        log.set_capacity(8);
        log.record(Stored, 1);
        log.record(Evicted, 1);
        let b = log.drain();
        assert_eq!(
            (b.first_seq, b.kinds, b.hashes),
            (1, vec![Stored, Evicted], vec![1, 1])
        );
        log.record(Stored, 7);
        let b = log.drain();
        assert_eq!(
            (b.first_seq, b.hashes, b.resync_needed),
            (3, vec![7], false)
        );
        assert_eq!(
            log.drain().first_seq,
            4,
            "an empty drain names the next seq"
        );
    }

    #[test]
    fn overflow_drops_and_flags_resync_then_resumes() {
        let mut log = KvEventLog::default();
        log.set_capacity(2);
        for h in 0..5 {
            log.record(Stored, h);
        }
        let b = log.drain();
        assert!(b.resync_needed && b.kinds.is_empty());
        assert_eq!(log.last_seq(), 5, "dropped events still count");
        log.record(Stored, 5);
        log.record(Evicted, 3);
        let b = log.drain();
        assert!(!b.resync_needed, "the drain reset the flag");
        assert_eq!((b.first_seq, b.hashes), (6, vec![5, 3]));
    }
}
