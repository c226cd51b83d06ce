//! Test harness: a simulated paged KV cache that executes plans exactly as the runner
//! must (swap_out, swap_in, copies, host-tier loads, then writes at slot_mapping, and the
//! host-tier offloads last, as if they ran beside the forward), a scripted model whose
//! next token is a hash of the context it reads back from that cache, and a reference
//! that generates the same tokens without any scheduler.

#![allow(dead_code)]

use std::collections::HashMap;

use kvserve_core::{Plan, RequestParams, Scheduler};
use xxhash_rust::xxh3::xxh3_64;

pub const VOCAB: i64 = 97;

/// The scripted "model": the next token is a function of the whole context.
pub fn model(context: &[i64]) -> i64 {
    let bytes: Vec<u8> = context.iter().flat_map(|t| t.to_le_bytes()).collect();
    (xxh3_64(&bytes) % VOCAB as u64) as i64
}

/// What a request generates with no scheduler at all: (output tokens, finish reason).
pub fn reference(p: &RequestParams, max_model_len: usize) -> (Vec<i64>, &'static str) {
    let mut ctx = p.prompt_token_ids.clone();
    let mut out = Vec::new();
    loop {
        let t = model(&ctx);
        ctx.push(t);
        out.push(t);
        let n = out.len();
        if n >= p.min_tokens {
            let eos = !p.ignore_eos && p.eos_token_id == Some(t);
            if eos || p.stop_token_ids.contains(&t) {
                return (out, "stop");
            }
        }
        if n >= p.max_tokens || ctx.len() >= max_model_len {
            return (out, "length");
        }
    }
}

/// Small deterministic RNG (xorshift64*), so failures reproduce from a seed.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

type Slot = Option<(i64, i64)>; // (token, position) stored in a KV slot

/// The runner's side: GPU and host caches of (token, position) per slot.
pub struct Sim {
    pub block_size: usize,
    pub gpu: Vec<Slot>,
    pub host: Vec<Slot>,
    /// Every live request's true tokens (prompt + outputs), by handle.
    pub tokens: HashMap<u64, Vec<i64>>,
    pub ids: HashMap<u64, String>,
    /// Recycled block-table buffers, as the Python binding keeps them: contents and the
    /// stamp they were last synced at. Plans read their table through one of these.
    tables: Vec<(Vec<i32>, Option<u64>)>,
    next_table: usize,
}

impl Sim {
    pub fn new(num_gpu_blocks: usize, num_host_blocks: usize, block_size: usize) -> Self {
        Sim {
            block_size,
            gpu: vec![None; num_gpu_blocks * block_size],
            host: vec![None; num_host_blocks * block_size],
            tokens: HashMap::new(),
            ids: HashMap::new(),
            tables: vec![(Vec::new(), None); 3],
            next_table: 0,
        }
    }

    pub fn add(
        &mut self,
        s: &mut Scheduler,
        p: RequestParams,
    ) -> Result<u64, kvserve_core::CoreError> {
        let prompt = p.prompt_token_ids.clone();
        let id = p.request_id.clone();
        let h = s.add_request(p)?;
        self.tokens.insert(h, prompt);
        self.ids.insert(h, id);
        Ok(h)
    }

    /// Runs a plan like the runner: copies, KV writes, then the model on each sampled row,
    /// reading the context back through the block table. Panics on any inconsistency.
    pub fn execute(&mut self, s: &Scheduler, plan: &Plan) -> Vec<i64> {
        let bs = self.block_size;
        let nb = plan.max_blocks;
        let table = self.plan_table(s, plan);
        let copy_blocks = |src: &[Slot], dst: &mut [Slot], a: i64, b: i64| {
            let (a, b) = (a as usize * bs, b as usize * bs);
            let tmp: Vec<Slot> = src[a..a + bs].to_vec();
            dst[b..b + bs].clone_from_slice(&tmp);
        };
        for pr in plan.swap_out.chunks(2) {
            let (g, h) = (pr[0], pr[1]);
            let gpu = self.gpu.clone();
            copy_blocks(&gpu, &mut self.host, g, h);
        }
        for pr in plan.swap_in.chunks(2) {
            let host = self.host.clone();
            copy_blocks(&host, &mut self.gpu, pr[0], pr[1]);
        }
        for pr in plan.copies.chunks(2) {
            let gpu = self.gpu.clone();
            copy_blocks(&gpu, &mut self.gpu, pr[0], pr[1]);
        }
        for pr in plan.loads.chunks(2) {
            let host = self.host.clone();
            copy_blocks(&host, &mut self.gpu, pr[0], pr[1]);
        }
        // Offloads may run beside the forward: their GPU blocks must not change meanwhile.
        let offload_src: Vec<Vec<Slot>> = plan
            .offloads
            .chunks(2)
            .map(|pr| {
                let a = pr[0] as usize * bs;
                self.gpu[a..a + bs].to_vec()
            })
            .collect();
        assert_eq!(plan.query_start_loc.len(), plan.num_seqs + 1);
        assert_eq!(
            *plan.query_start_loc.last().unwrap() as usize,
            plan.num_tokens
        );
        assert_eq!(plan.input_ids.len(), plan.num_tokens);
        for i in 0..plan.num_tokens {
            let slot = plan.slot_mapping[i] as usize;
            self.gpu[slot] = Some((plan.input_ids[i], plan.positions[i]));
        }
        let mut sampled = Vec::new();
        let mut sample_row = 0;
        for i in 0..plan.num_seqs {
            let h = plan.handles[i];
            let truth = &self.tokens[&h];
            let (a, b) = (
                plan.query_start_loc[i] as usize,
                plan.query_start_loc[i + 1] as usize,
            );
            let seq_len = plan.seq_lens[i] as usize;
            if i < plan.num_decodes {
                assert_eq!(b - a, 1, "decode rows have one token");
            }
            // New tokens are the request's true tokens at consecutive positions.
            for (k, row) in (a..b).enumerate() {
                let pos = seq_len - (b - a) + k;
                assert_eq!(plan.positions[row] as usize, pos);
                assert_eq!(plan.input_ids[row], truth[pos], "input id at pos {pos}");
            }
            // The whole context reads back from the cache through the block table.
            let table = &table[i * nb..(i + 1) * nb];
            // A row holds exactly the blocks its context needs, then -1 padding.
            let used = seq_len.div_ceil(bs);
            assert!(table[..used].iter().all(|&b| b >= 0), "row {i}: {table:?}");
            assert!(table[used..].iter().all(|&b| b == -1), "row {i}: {table:?}");
            let mut ctx = Vec::with_capacity(seq_len);
            for p in 0..seq_len {
                let blk = table[p / bs];
                assert!(blk >= 0, "block table too short for position {p}");
                let cell = self.gpu[blk as usize * bs + p % bs];
                assert_eq!(
                    cell,
                    Some((truth[p], p as i64)),
                    "KV of handle {h} at position {p}"
                );
                ctx.push(truth[p]);
            }
            if sample_row < plan.sample_handles.len() && plan.sample_handles[sample_row] == h {
                assert_eq!(plan.logits_indices[sample_row] as usize, b - 1);
                assert_eq!(seq_len, truth.len(), "sampled rows complete their context");
                sampled.push(model(&ctx));
                sample_row += 1;
            } else {
                assert!(
                    seq_len < truth.len(),
                    "unsampled rows are mid-prefill chunks"
                );
            }
        }
        assert_eq!(
            sample_row,
            plan.sample_handles.len(),
            "sample rows follow sequence order"
        );
        for (pr, before) in plan.offloads.chunks(2).zip(&offload_src) {
            let a = pr[0] as usize * bs;
            assert_eq!(
                &self.gpu[a..a + bs],
                &before[..],
                "GPU block {} written while it was being offloaded",
                pr[0]
            );
            // A full cached block: every slot holds K/V.
            assert!(
                before.iter().all(|c| c.is_some()),
                "offload of a partial block"
            );
            let gpu = self.gpu.clone();
            copy_blocks(&gpu, &mut self.host, pr[0], pr[1]);
        }
        sampled
    }

    /// A failed host-tier copy: what its loads and offloads wrote is junk.
    pub fn corrupt_tier_copies(&mut self, plan: &Plan) {
        let bs = self.block_size;
        for pr in plan.loads.chunks(2) {
            let a = pr[1] as usize * bs;
            self.gpu[a..a + bs].fill(Some((-1, -1)));
        }
        for pr in plan.offloads.chunks(2) {
            let a = pr[1] as usize * bs;
            self.host[a..a + bs].fill(Some((-1, -1)));
        }
    }

    /// The plan's block table, synced into the next recycled buffer (which may be several
    /// steps stale, or too small and replaced); it must equal the scheduler's own copy.
    fn plan_table(&mut self, s: &Scheduler, plan: &Plan) -> Vec<i32> {
        let want = plan.num_seqs * plan.max_blocks;
        let (buf, stamp) = &mut self.tables[self.next_table];
        self.next_table = (self.next_table + 1) % 3;
        if buf.len() < want {
            *buf = vec![-7; want + want / 4];
            *stamp = None;
        }
        *stamp = Some(s.sync_block_table(&mut buf[..want], *stamp).expect("sync"));
        assert_eq!(&buf[..want], s.block_table(), "synced table differs");
        buf[..want].to_vec()
    }

    /// schedule -> execute -> commit; records outputs; returns finished (id, reason).
    pub fn step(&mut self, s: &mut Scheduler) -> Vec<(String, &'static str)> {
        let plan = s.schedule().expect("schedule");
        let sampled = self.execute(s, &plan);
        let finished = self.commit(s, &plan, &sampled);
        // Every other plan is handed back for the next schedule to refill.
        if plan.id % 2 == 0 {
            s.recycle_plan(plan);
        }
        finished
    }

    pub fn commit(
        &mut self,
        s: &mut Scheduler,
        plan: &Plan,
        sampled: &[i64],
    ) -> Vec<(String, &'static str)> {
        let out = s.commit(plan.id, sampled).expect("commit");
        for (h, t) in out.handles.iter().zip(&out.token_ids) {
            self.tokens.get_mut(h).expect("known handle").push(*t);
        }
        let finished = out
            .finished_ids
            .iter()
            .cloned()
            .zip(out.finish_reasons.iter().copied())
            .collect();
        // Reused by the next commit: stale contents must never show through.
        s.recycle_output(out);
        finished
    }
}

/// A fingerprint of everything observable, to prove an error changed nothing.
pub fn fingerprint(s: &Scheduler) -> String {
    format!("{:?}", s.metrics())
}
