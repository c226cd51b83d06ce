//! Load figures a router asks a replica for, beyond the counters in `metrics()`.

use super::Scheduler;

impl Scheduler {
    /// Tokens the waiting requests still have to prefill before their first output
    /// (their whole context for a recompute-preempted request).
    pub fn waiting_prompt_tokens(&self) -> usize {
        self.waiting
            .iter()
            .filter_map(|k| self.slots.get(k.slot).and_then(Option::as_ref))
            .map(|r| r.num_tokens().saturating_sub(r.num_computed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, RequestParams, Scheduler};

    #[test]
    fn counts_what_waits() {
        let cfg = Config {
            num_gpu_blocks: 4,
            block_size: 4,
            max_num_seqs: 1,
            ..Config::default()
        };
        let mut s = Scheduler::new(cfg).unwrap();
        for (i, n) in [5usize, 7].iter().enumerate() {
            s.add_request(RequestParams {
                request_id: format!("r{i}"),
                prompt_token_ids: vec![1; *n],
                max_tokens: 1,
                ..RequestParams::default()
            })
            .unwrap();
        }
        assert_eq!(s.waiting_prompt_tokens(), 12);
        let plan = s.schedule().unwrap();
        assert_eq!(plan.num_seqs, 1);
        assert_eq!(
            s.waiting_prompt_tokens(),
            7,
            "the admitted one no longer waits"
        );
    }
}
