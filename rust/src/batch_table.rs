//! The last plan's padded block table, kept across steps (a "persistent batch").
//!
//! A steady decode batch keeps its rows from one step to the next and each row gains at
//! most one block every `block_size` steps, so rebuilding the table from every request's
//! own block list each step (one scattered heap row per sequence) wastes most of the step
//! on cache misses. Here the next table is built in place over the last one: a row whose
//! sequence sat in the same row last time only gets its new blocks written; a sequence
//! that moved up (an earlier row finished) has its old row moved with one `copy_within`;
//! anything else is written from the request's block list.
//!
//! The plan's own table is a copy kept in a caller's buffer (the binding recycles numpy
//! buffers that Python no longer references). Every write stamps its row with the step,
//! so `sync_into` brings a buffer last synced at step k up to date by copying only the
//! rows written since k: a steady decode batch copies a handful of rows per step instead
//! of the whole [num_seqs, max_blocks] table.
//!
//! A row is reused only when its key matches: the request's handle (unique for the life
//! of the core) and its block generation, which the scheduler bumps whenever it clears a
//! request's blocks (preemption, admission), so between two matches blocks were only
//! appended.

/// Identity of the block list a row was written from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowKey {
    pub handle: u64,
    pub blocks_gen: u32,
}

const NO_ROW: u32 = u32::MAX;

#[derive(Debug, Default)]
pub(crate) struct BatchTable {
    /// Columns of `table`: the last plan's `max_blocks`.
    stride: usize,
    /// Row-major [keys.len(), stride], padded with -1.
    table: Vec<i32>,
    keys: Vec<RowKey>,
    /// Blocks written in each row.
    lens: Vec<u32>,
    /// Each row's last block (-1 if none): a decode's new token goes there, and reading
    /// it from this dense array spares a cache miss on the row itself.
    last: Vec<i32>,
    /// Row each request slot had in the last table (NO_ROW if none); checked by key.
    row_of_slot: Vec<u32>,
    /// Step of this table (`begin` counts them from 1).
    stamp: u64,
    /// Step in which each row was last written.
    row_stamp: Vec<u64>,
    /// Step in which the stride last changed: a buffer synced before it is rewritten whole.
    layout_stamp: u64,
}

impl BatchTable {
    /// Starts a table of `num_rows` rows and `stride` columns; rows are kept for `set_row`
    /// (re-laid out in place when the stride changed).
    pub fn begin(&mut self, num_rows: usize, stride: usize, num_slots: usize) {
        self.stamp += 1;
        if stride != self.stride {
            self.restride(stride);
            self.layout_stamp = self.stamp;
        }
        if self.row_of_slot.len() < num_slots {
            self.row_of_slot.resize(num_slots, NO_ROW);
        }
        let old_rows = self.keys.len();
        if num_rows > old_rows {
            self.table.resize(num_rows * stride, -1);
            self.keys.resize(
                num_rows,
                RowKey {
                    handle: u64::MAX,
                    blocks_gen: 0,
                },
            );
            self.lens.resize(num_rows, 0);
            self.last.resize(num_rows, -1);
            self.row_stamp.resize(num_rows, self.stamp);
        }
    }

    /// Re-lays the rows out at `stride` columns in place. The stride is the batch's longest
    /// row, so it changes whenever that sequence gains a block (every `block_size` steps of
    /// a decode-heavy batch): moving each row is far cheaper than rewriting every row from
    /// its request's block list. A row too long for a narrower stride is dropped (its key
    /// cleared, so `set_row` writes it afresh).
    fn restride(&mut self, stride: usize) {
        let old = self.stride;
        let rows = self.keys.len();
        if stride > old {
            self.table.resize(rows * stride, -1);
            // Last row first: each row moves to a later place, past every earlier row.
            for i in (0..rows).rev() {
                self.table.copy_within(i * old..(i + 1) * old, i * stride);
                self.table[i * stride + old..(i + 1) * stride].fill(-1);
            }
        } else {
            // First row first: each row moves to an earlier place, before every later row.
            for i in 0..rows {
                self.table
                    .copy_within(i * old..i * old + stride, i * stride);
            }
            self.table.truncate(rows * stride);
            for i in 0..rows {
                if self.lens[i] as usize > stride {
                    self.keys[i] = RowKey {
                        handle: u64::MAX,
                        blocks_gen: 0,
                    };
                    self.lens[i] = 0;
                    self.last[i] = -1;
                }
            }
        }
        self.stride = stride;
    }

    /// Makes row `i` (rows are set in increasing order) hold the `num_blocks` blocks of
    /// the request in `slot`; `blocks` gives them and is called only when the row must be
    /// rewritten. Returns whether the row already held exactly these blocks.
    #[inline]
    pub fn set_row<'a>(
        &mut self,
        i: usize,
        slot: usize,
        key: RowKey,
        num_blocks: usize,
        blocks: impl FnOnce() -> &'a [u32],
    ) -> bool {
        // A steady decode row: same place, same blocks; nothing to write.
        if self.row_of_slot[slot] as usize == i
            && i < self.keys.len()
            && self.keys[i] == key
            && self.lens[i] as usize == num_blocks
        {
            return true;
        }
        self.rewrite_row(i, slot, key, num_blocks, blocks());
        false
    }

    /// `set_row` for a row that moved, grew or is new.
    #[inline(never)]
    fn rewrite_row(
        &mut self,
        i: usize,
        slot: usize,
        key: RowKey,
        num_blocks: usize,
        blocks: &[u32],
    ) {
        let stride = self.stride;
        // Where this request's row was last time; rows below `i` are already rewritten.
        let old = self.row_of_slot[slot];
        let (have, last) = if old != NO_ROW
            && (old as usize) >= i
            && (old as usize) < self.keys.len()
            && self.keys[old as usize] == key
            && self.lens[old as usize] as usize <= num_blocks
        {
            let old = old as usize;
            if old != i {
                self.table
                    .copy_within(old * stride..(old + 1) * stride, i * stride);
            }
            (self.lens[old] as usize, self.last[old])
        } else {
            let row = &mut self.table[i * stride..(i + 1) * stride];
            row[num_blocks..].fill(-1);
            (0, -1)
        };
        self.row_stamp[i] = self.stamp;
        self.last[i] = last;
        if have < num_blocks {
            let row = &mut self.table[i * stride..(i + 1) * stride];
            for (dst, &b) in row[have..num_blocks]
                .iter_mut()
                .zip(&blocks[have..num_blocks])
            {
                *dst = b as i32;
            }
            self.last[i] = row[num_blocks - 1];
        }
        self.keys[i] = key;
        self.lens[i] = num_blocks as u32;
        self.row_of_slot[slot] = i as u32;
    }

    /// Columns of the table: the last plan's `max_blocks`.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Blocks row `i` holds.
    #[inline]
    pub fn row_len(&self, i: usize) -> usize {
        self.lens[i] as usize
    }

    /// Block `j` of row `i` (the caller knows it was set).
    #[inline]
    pub fn block(&self, i: usize, j: usize) -> i32 {
        if j + 1 == self.lens[i] as usize {
            self.last[i]
        } else {
            self.table[i * self.stride + j]
        }
    }

    /// Drops rows past `num_rows`: the table is now the plan's, [num_rows, stride].
    pub fn finish(&mut self, num_rows: usize) {
        self.table.truncate(num_rows * self.stride);
        self.keys.truncate(num_rows);
        self.lens.truncate(num_rows);
        self.last.truncate(num_rows);
        self.row_stamp.truncate(num_rows);
    }

    /// The table, row-major [rows, stride], padded with -1.
    pub fn as_slice(&self) -> &[i32] {
        &self.table
    }

    /// Brings `dst` (exactly the table's length) up to date and returns the stamp to pass
    /// next time. `since` is the stamp `dst` was last synced at with this table, or None
    /// if its contents are unknown. A row that was dropped and set again is written at a
    /// later stamp, so any row not written since `since` is already in `dst`.
    pub fn sync_into(&self, dst: &mut [i32], since: Option<u64>) -> u64 {
        debug_assert_eq!(dst.len(), self.table.len());
        let stride = self.stride;
        match since {
            Some(k) if k >= self.layout_stamp && stride > 0 => {
                for (i, &st) in self.row_stamp.iter().enumerate() {
                    if st > k {
                        let row = i * stride..(i + 1) * stride;
                        dst[row.clone()].copy_from_slice(&self.table[row]);
                    }
                }
            }
            _ => dst.copy_from_slice(&self.table),
        }
        self.stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny xorshift so the test needs no dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random batches (requests come and go, gain blocks, get their blocks reset, change
    /// order) must always give exactly the table built from scratch.
    #[test]
    fn matches_a_table_built_from_scratch() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for _case in 0..200 {
            let mut t = BatchTable::default();
            let num_slots = 1 + rng.below(12) as usize;
            // Per slot: (handle, gen, blocks); None = no request.
            let mut reqs: Vec<Option<(u64, u32, Vec<u32>)>> = vec![None; num_slots];
            let mut next_handle = 0u64;
            let mut next_block = 0u32;
            // Recycled plan buffers: contents and the stamp they were synced at.
            let mut bufs: Vec<(Vec<i32>, Option<u64>)> = vec![(Vec::new(), None); 3];
            for _step in 0..40 {
                for r in reqs.iter_mut() {
                    match rng.below(10) {
                        0 => *r = None,
                        1 | 2 if r.is_none() => {
                            *r = Some((next_handle, 0, Vec::new()));
                            next_handle += 1;
                        }
                        3 => {
                            if let Some((_, g, b)) = r {
                                *g += 1;
                                b.clear();
                            }
                        }
                        _ => {}
                    }
                    if let Some((_, _, b)) = r {
                        for _ in 0..rng.below(3) {
                            b.push(next_block);
                            next_block += 1;
                        }
                    }
                }
                // Mostly stable order, sometimes a swap, sometimes a row left out.
                let mut order: Vec<usize> = (0..num_slots).filter(|&s| reqs[s].is_some()).collect();
                if order.len() > 1 && rng.below(4) == 0 {
                    let a = rng.below(order.len() as u64) as usize;
                    let b = rng.below(order.len() as u64) as usize;
                    order.swap(a, b);
                }
                if !order.is_empty() && rng.below(4) == 0 {
                    order.remove(rng.below(order.len() as u64) as usize);
                }
                let max_blocks = order
                    .iter()
                    .map(|&s| reqs[s].as_ref().map_or(0, |r| r.2.len()))
                    .max()
                    .unwrap_or(0);
                t.begin(order.len(), max_blocks, num_slots);
                let mut want = Vec::new();
                for (i, &s) in order.iter().enumerate() {
                    let (h, g, b) = reqs[s].as_ref().expect("live");
                    let key = RowKey {
                        handle: *h,
                        blocks_gen: *g,
                    };
                    t.set_row(i, s, key, b.len(), || b.as_slice());
                    want.extend(b.iter().map(|&x| x as i32));
                    want.extend(std::iter::repeat_n(-1, max_blocks - b.len()));
                    for (j, &x) in b.iter().enumerate() {
                        assert_eq!(t.block(i, j), x as i32);
                    }
                }
                t.finish(order.len());
                assert_eq!(t.as_slice(), want.as_slice());
                // Every buffer, whenever it was last synced, comes out equal to the table.
                for buf in bufs.iter_mut() {
                    if rng.below(3) == 0 {
                        continue; // this one is still held by a caller
                    }
                    let (data, stamp) = buf;
                    // A buffer is used through its first `want.len()` entries; one too
                    // small is replaced by a bigger one of unknown contents.
                    if data.len() < want.len() {
                        *data = vec![7; want.len() + rng.below(5) as usize];
                        *stamp = None;
                    }
                    *stamp = Some(t.sync_into(&mut data[..want.len()], *stamp));
                    assert_eq!(&data[..want.len()], want.as_slice());
                }
            }
        }
    }
}
