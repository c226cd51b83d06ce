//! The log of ended requests `request_stats` still answers for.

use std::collections::{HashMap, VecDeque};

use super::RequestStats;

/// The stats of the last `capacity` distinct ids that ended, each as of its latest
/// end. An id that ends again moves to the back: its older entry in `order` goes stale
/// (its sequence number no longer matches) and is skipped when it reaches the front.
#[derive(Debug, Default)]
pub(super) struct FinishedLog {
    /// Id -> (sequence number of its latest end, its stats then).
    by_id: HashMap<String, (u64, RequestStats)>,
    /// (id, sequence number) per end, oldest first; stale entries included.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
    capacity: usize,
}

impl FinishedLog {
    pub(super) fn new(capacity: usize) -> Self {
        FinishedLog {
            capacity,
            ..FinishedLog::default()
        }
    }

    /// (ids remembered, entries in the order queue, stale ones included).
    pub(super) fn len(&self) -> (usize, usize) {
        (self.by_id.len(), self.order.len())
    }

    pub(super) fn record(&mut self, id: String, stats: RequestStats) {
        if self.capacity == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.insert(id.clone(), (seq, stats));
        self.order.push_back((id, seq));
        while self.by_id.len() > self.capacity {
            let Some((old, old_seq)) = self.order.pop_front() else {
                break;
            };
            if self.by_id.get(&old).is_some_and(|(s, _)| *s == old_seq) {
                self.by_id.remove(&old);
            }
        }
        // Stale entries (ids ended again since) are dropped once they outnumber the live
        // ones, so `order` stays within twice the memory.
        if self.order.len() > 2 * self.capacity {
            let by_id = &self.by_id;
            self.order
                .retain(|(id, seq)| by_id.get(id).is_some_and(|(s, _)| s == seq));
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<&RequestStats> {
        self.by_id.get(id).map(|(_, stats)| stats)
    }
}
