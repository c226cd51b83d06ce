//! Load figures a router asks a replica for, beyond the counters in `metrics()`.

use super::Scheduler;

impl Scheduler {
    /// The prefill work ahead of a new request: tokens the waiting requests still have to
    /// prefill before their first output (their whole context for a recompute-preempted
    /// request), plus what running requests have left of a chunked prefill.
    pub fn waiting_prompt_tokens(&self) -> usize {
        let waiting: usize = self
            .waiting
            .iter()
            .filter_map(|k| self.slots.get(k.slot).and_then(Option::as_ref))
            .map(|r| r.num_tokens().saturating_sub(r.num_computed))
            .sum();
        let prefilling: usize = self
            .running
            .iter()
            .filter_map(|&slot| self.slots.get(slot).and_then(Option::as_ref))
            .map(|r| r.num_tokens().saturating_sub(r.num_computed))
            .filter(|&left| left > 1) // a decode's one token is its next step, not prefill
            .sum();
        waiting + prefilling
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
            12,
            "the admitted one is computed by the step in flight: still ahead"
        );
        s.commit(plan.id, &vec![5; plan.sample_handles.len()])
            .unwrap();
        assert_eq!(
            s.waiting_prompt_tokens(),
            7,
            "the admitted one is prefilled: only the waiting one is left"
        );
    }

    #[test]
    fn counts_a_running_prefill_chunk_still_to_come() {
        let cfg = Config {
            num_gpu_blocks: 16,
            block_size: 4,
            max_num_batched_tokens: 8,
            ..Config::default()
        };
        let mut s = Scheduler::new(cfg).unwrap();
        s.add_request(RequestParams {
            request_id: "long".into(),
            prompt_token_ids: vec![1; 20],
            max_tokens: 2,
            ..RequestParams::default()
        })
        .unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(plan.num_tokens, 8, "the first chunk of the prompt");
        s.commit(plan.id, &[]).unwrap();
        assert_eq!(s.num_running(), 1);
        assert_eq!(
            s.waiting_prompt_tokens(),
            12,
            "running, 12 prompt tokens still to prefill"
        );
        for _ in 0..2 {
            let plan = s.schedule().unwrap();
            let sampled = vec![5; plan.sample_handles.len()];
            s.commit(plan.id, &sampled).unwrap();
        }
        assert_eq!(s.waiting_prompt_tokens(), 0, "decoding: no prefill left");
    }
}
