//! Many steady decode steps in one call, for a simulator that knows every sampled token in
//! advance: `steady_outlook` says how many steps the steady batch can run before one must
//! take the full path (and when they take blocks), `run_steady` runs them (each a real
//! `schedule` + `commit`).

use super::Scheduler;

/// What the steady batch can do from here: `steps` steady steps, and the step (1-based)
/// at which each block they allocate is taken, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SteadyOutlook {
    pub steps: usize,
    pub grows_at: Vec<usize>,
}

impl Scheduler {
    /// How many steps (at most `max_steps`) the steady batch (see `steady::SteadyBatch`)
    /// can run from here, each sampling `token` for every row, before a commit may stop a
    /// request or a row needs a block when none is available (the full path would
    /// preempt); and when those steps allocate blocks. 0 steps when the next step is not
    /// a steady batch step (the last plan was not a steady one, or something else
    /// happened since its commit).
    pub fn steady_outlook(&self, token: i64, max_steps: usize) -> SteadyOutlook {
        let sb = &self.steady;
        let n = sb.handles.len();
        if !(self.steady_path
            && sb.committed
            && self.pending.is_none()
            && self.waiting.is_empty()
            && self.swapped.is_empty()
            && n > 0
            && self.running.len() == n
            && self.scratch.seqs.len() == n
            && self.scratch.samples.len() == n)
        {
            return SteadyOutlook::default();
        }
        let bs = self.cfg.block_size;
        let mut steps = max_steps;
        for (&p, rule) in sb.positions.iter().zip(&sb.stops) {
            // The last plan put this row's token at position p; step j puts it at p + j,
            // and its commit leaves p + j + 2 tokens (see `commit_steady_rows`).
            let p = usize::try_from(p).unwrap_or(0);
            let mut stops_at = rule.length_limit.saturating_sub(p + 2);
            if token == rule.stop_eos || rule.has_stop_ids {
                stops_at = stops_at.min(rule.min_len.saturating_sub(p + 2));
            }
            // The first step that may stop a request runs the full path: one before it.
            steps = steps.min(stops_at.max(1) - 1);
        }
        let mut grows_at = Vec::new();
        for (i, &p) in sb.positions.iter().enumerate() {
            let p = usize::try_from(p).unwrap_or(0);
            // The first position after p that starts a block the row lacks, then every
            // block start after it.
            let first = (p + 1).div_ceil(bs) * bs;
            let mut at = first.max(self.batch.row_len(i) * bs) - p;
            while at <= steps {
                grows_at.push(at);
                at += bs;
            }
        }
        // Rows grow in row order within a step; which row takes which block is the core's
        // business, only the count per step matters here.
        grows_at.sort_unstable();
        let available = self.gpu.num_available();
        if grows_at.len() > available {
            // The step that takes the first block beyond what is available runs the full
            // path, and so does every step after it.
            steps = grows_at[available] - 1;
            grows_at.truncate(grows_at.partition_point(|&j| j <= steps));
        }
        SteadyOutlook { steps, grows_at }
    }

    /// Runs up to `max_steps` steady steps, each planned and committed as `schedule` and
    /// `commit` would with `token` sampled for every row, and stops before the first step
    /// that is not a steady one, lacks a block or may stop a request (see
    /// `steady_outlook`). Returns the number of steps run; the core is then between steps
    /// (no plan pending), as after a `commit`.
    pub fn run_steady(&mut self, max_steps: usize, token: i64) -> usize {
        let todo = self.steady_outlook(token, max_steps).steps;
        let tokens = vec![token; self.steady.handles.len()];
        let mut done = 0;
        while done < todo {
            let Some(plan) = self.schedule_steady() else {
                break;
            };
            let id = plan.id;
            self.recycle_plan(plan);
            // The plan was just issued with one sample row per steady row: the commit
            // cannot be refused.
            match self.commit(id, &tokens) {
                Ok(out) => self.recycle_output(out),
                Err(_) => break,
            }
            done += 1;
        }
        done
    }
}
