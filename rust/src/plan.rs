//! The per-step batch plan handed to the runner as flat arrays, and a commit's output.

/// One step's work. Arrays are flat so the binding can hand them to numpy without a copy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub id: u64,
    pub num_seqs: usize,
    pub num_tokens: usize,
    /// The first `num_decodes` sequences have exactly one new token each.
    pub num_decodes: usize,
    pub handles: Vec<u64>,
    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub slot_mapping: Vec<i64>,
    /// num_seqs + 1 prefix sums of new tokens.
    pub query_start_loc: Vec<i32>,
    /// Context length after this step.
    pub seq_lens: Vec<i32>,
    /// Columns of the plan's block table. The table itself ([num_seqs, max_blocks],
    /// row-major, padded with -1) stays in the scheduler until the next `schedule`:
    /// `Scheduler::block_table` reads it, `Scheduler::sync_block_table` copies it.
    pub max_blocks: usize,
    pub logits_indices: Vec<i64>,
    pub sample_handles: Vec<u64>,
    /// Flattened pairs: (gpu, host), (host, gpu), (src gpu, dst gpu).
    pub swap_out: Vec<i64>,
    pub swap_in: Vec<i64>,
    pub copies: Vec<i64>,
    /// Host prefix tier, flattened pairs: (gpu, host) copies of idle cached GPU blocks
    /// (the GPU block is neither written nor reused before this plan's commit, so these
    /// may overlap the forward but must finish before `commit`), and (host, gpu) loads
    /// into fresh GPU blocks (must land before the forward reads them).
    pub offloads: Vec<i64>,
    pub loads: Vec<i64>,
    /// The previous plan's id when this plan is that plan's forward one step on: the same
    /// rows, all decodes, each one position further and fed the token its commit sampled,
    /// the same block table, nothing to swap or copy (a decode step run ahead on the
    /// device is then this plan's step). None otherwise.
    pub continues_plan_id: Option<u64>,
    /// Decode-only, nothing to swap or copy, and every row's next position lies in the
    /// block its current one does and below max_model_len: the step after this one
    /// writes each row's K/V to the slot after this step's. A step run ahead on the
    /// device (inputs advanced by one) then writes only where the next plan would.
    pub advances_in_place: bool,
}

impl Plan {
    /// Sets `advances_in_place` from the plan's columns (the rule lives here alone).
    pub(crate) fn set_advances_in_place(&mut self, block_size: usize, max_model_len: usize) {
        let mask = block_size as i64 - 1;
        let limit = max_model_len as i64;
        self.advances_in_place = self.num_seqs > 0
            && self.num_decodes == self.num_seqs
            && self.swap_out.is_empty()
            && self.swap_in.is_empty()
            && self.copies.is_empty()
            && self
                .positions
                .iter()
                .all(|&p| (p + 1) & mask != 0 && p + 1 < limit);
    }
}

impl Plan {
    /// Whether the plan must be committed before the next `schedule`: it has sequences,
    /// or host-tier copies whose completion the commit reports.
    pub fn must_commit(&self) -> bool {
        self.num_seqs > 0 || !self.offloads.is_empty() || !self.loads.is_empty()
    }
}

/// What a commit appended and who finished.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    pub handles: Vec<u64>,
    pub token_ids: Vec<i64>,
    pub finished_handles: Vec<u64>,
    pub finish_reasons: Vec<&'static str>,
    pub finished_ids: Vec<String>,
    /// Each finished request's prompt tokens served from the prefix cache at its first
    /// admission (aligned with `finished_handles`).
    pub finished_cached_prompt_tokens: Vec<u64>,
}
