//! Many steady decode steps in one call, for a simulator that knows every sampled token in
//! advance: `steady_outlook` says how many steps the steady batch can run before one must
//! take the full path, `run_steady` runs them (each a real `schedule` + `commit`).

use super::Scheduler;

impl Scheduler {
    /// How many steps the steady batch (see `steady::SteadyBatch`) can run from here, each
    /// sampling `token` for every row, before a step allocates a block or a commit may stop
    /// a request. 0 when the next step is not a steady batch step (the last plan was not a
    /// steady one, or something else happened since its commit).
    pub fn steady_outlook(&self, token: i64) -> usize {
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
            return 0;
        }
        let bs = self.cfg.block_size;
        let mut steps = usize::MAX;
        for (i, (&p, rule)) in sb.positions.iter().zip(&sb.stops).enumerate() {
            // The last plan put this row's token at position p; step j puts it at p + j.
            let p = usize::try_from(p).unwrap_or(0);
            // The first position at or after p + 1 that starts a block the row lacks.
            let next_block_start = (p + 1).div_ceil(bs) * bs;
            let grows_at = next_block_start.max(self.batch.row_len(i) * bs);
            // Step j's commit leaves p + j + 2 tokens (see `commit_steady_rows`).
            let mut stops_at = rule.length_limit.saturating_sub(p + 2);
            if token == rule.stop_eos || rule.has_stop_ids {
                stops_at = stops_at.min(rule.min_len.saturating_sub(p + 2));
            }
            // The first step that grows or may stop runs the full path: one before it.
            let first = (grows_at - p).min(stops_at.max(1));
            steps = steps.min(first - 1);
        }
        steps
    }

    /// Runs up to `max_steps` steady steps, each planned and committed as `schedule` and
    /// `commit` would with `token` sampled for every row, and stops before the first step
    /// that is not a steady one, allocates a block or may stop a request (see
    /// `steady_outlook`). Returns the number of steps run; the core is then between steps
    /// (no plan pending), as after a `commit`.
    pub fn run_steady(&mut self, max_steps: usize, token: i64) -> usize {
        let todo = self.steady_outlook(token).min(max_steps);
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
