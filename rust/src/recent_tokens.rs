//! A dense buffer of each request's latest output tokens, one cache line per request slot.
//!
//! Appending a sampled token straight to the request's token Vec touches a different,
//! long-cold cache line (and page) per sequence every step: with thousands of running
//! decodes that store miss was most of `commit`. Here the token goes to the request
//! slot's line of one dense array (sequential for a steady batch, so the hardware
//! prefetcher keeps up), and the line is moved into the token Vec once it is full, or
//! whenever the full token list is needed (block hashing, preemption): one cold line
//! every `RECENT_CAP` steps instead of every step.

use crate::request::Request;

/// Tokens one row holds: sixteen i64, two 64-byte cache lines. With 16-token blocks the
/// row is mostly moved by block hashing (which needs the tokens anyway) before it fills.
pub(crate) const RECENT_CAP: usize = 16;

#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Row([i64; RECENT_CAP]);

#[derive(Debug, Default)]
pub(crate) struct RecentTokens {
    rows: Vec<Row>,
}

impl RecentTokens {
    /// Makes room for request slots `0..num_slots`.
    pub fn ensure_slots(&mut self, num_slots: usize) {
        if self.rows.len() < num_slots {
            self.rows.resize(num_slots, Row::default());
        }
    }

    /// The request's tokens not yet in `r.tokens` (its slot is `slot`).
    pub fn pending(&self, r: &Request, slot: usize) -> &[i64] {
        &self.rows[slot].0[..r.num_recent]
    }

    /// Appends `token` to the request in `slot`, moving the row into `r.tokens` once full.
    #[inline]
    pub fn push(&mut self, r: &mut Request, slot: usize, token: i64) {
        let row = &mut self.rows[slot].0;
        row[r.num_recent] = token;
        r.num_recent += 1;
        if r.num_recent == RECENT_CAP {
            r.tokens.extend_from_slice(row);
            r.num_recent = 0;
        }
    }

    /// Moves the request's pending tokens into `r.tokens`.
    pub fn flush(&self, r: &mut Request, slot: usize) {
        if r.num_recent > 0 {
            r.tokens
                .extend_from_slice(&self.rows[slot].0[..r.num_recent]);
            r.num_recent = 0;
        }
    }
}
