//! `run_steady` (many steady decode steps in one call) against the same steps taken one
//! `schedule` + `commit` at a time: two cores driven by the same random arrivals, one
//! coasting whenever its outlook allows, give identical metrics and block use after every
//! coast; each coasted step is a decode-only step that finishes nothing, and the blocks
//! it takes are where the outlook said.

mod common;

use common::Rng;
use kvserve_core::{Config, PreemptionMode, RequestParams, Scheduler};

const TOKEN: i64 = 5;

fn config(rng: &mut Rng) -> Config {
    Config {
        num_gpu_blocks: rng.range(16, 160) as usize,
        block_size: 1 << rng.range(0, 5),
        num_host_blocks: rng.range(0, 32) as usize,
        max_num_seqs: rng.range(1, 10) as usize,
        max_num_batched_tokens: rng.range(16, 128) as usize,
        max_model_len: rng.range(32, 400) as usize,
        max_waiting: 64,
        enable_prefix_caching: rng.chance(0.8),
        preemption_mode: PreemptionMode::Recompute,
        ..Config::default()
    }
}

fn request(rng: &mut Rng, i: usize, cfg: &Config) -> RequestParams {
    let len = rng.range(1, (cfg.max_model_len / 3).max(2) as u64) as usize;
    RequestParams {
        request_id: format!("r{i}"),
        prompt_token_ids: (0..len).map(|j| ((i % 3) * 7 + j) as i64 % 50).collect(),
        max_tokens: rng.range(1, cfg.max_model_len as u64) as usize,
        // An eos equal to the sampled token stops coasting at min_tokens.
        eos_token_id: rng.chance(0.2).then_some(TOKEN),
        min_tokens: rng.below(20) as usize,
        ignore_eos: rng.chance(0.5),
        ..RequestParams::default()
    }
}

fn observable(s: &Scheduler) -> String {
    format!(
        "{:?} used {} running {} waiting {}",
        s.metrics(),
        s.gpu_pool().num_used(),
        s.num_running(),
        s.num_waiting()
    )
}

fn step(s: &mut Scheduler) -> (usize, usize, usize, usize) {
    let used = s.gpu_pool().num_used();
    let plan = s.schedule().expect("schedule");
    let grew = s.gpu_pool().num_used().saturating_sub(used);
    let tokens = vec![TOKEN; plan.sample_handles.len()];
    let out = s.commit(plan.id, &tokens).expect("commit");
    (
        plan.num_seqs,
        plan.num_decodes,
        out.finished_handles.len(),
        grew,
    )
}

fn run(seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let cfg = config(&mut rng);
    let mut fast = Scheduler::new(cfg.clone()).expect("config");
    let mut slow = Scheduler::new(cfg.clone()).expect("config");
    let mut coasted = 0;
    for i in 0..60 {
        if rng.chance(0.6) {
            let p = request(&mut rng, i, &cfg);
            let a = fast.add_request(p.clone()).is_ok();
            assert_eq!(a, slow.add_request(p).is_ok());
        }
        for _ in 0..rng.range(1, 40) {
            let outlook = fast.steady_outlook(TOKEN, 1 << 20);
            let k = outlook.steps;
            assert_eq!(k, slow.steady_outlook(TOKEN, 1 << 20).steps);
            if k == 0 {
                assert_eq!(step(&mut fast), step(&mut slow));
                continue;
            }
            let n = rng.range(1, k as u64) as usize; // inclusive
            assert_eq!(fast.run_steady(n, TOKEN), n, "seed {seed}");
            let mut grown = Vec::new();
            for j in 1..=n {
                let (seqs, decodes, finished, grew) = step(&mut slow);
                assert!(seqs > 0 && seqs == decodes && finished == 0, "seed {seed}");
                grown.extend(std::iter::repeat_n(j, grew));
            }
            let predicted: Vec<usize> = outlook.grows_at.into_iter().filter(|&j| j <= n).collect();
            assert_eq!(
                grown, predicted,
                "seed {seed}: blocks taken where the outlook said"
            );
            assert_eq!(observable(&fast), observable(&slow), "seed {seed}");
            fast.check_invariants().expect("invariants");
            coasted += n;
        }
    }
    coasted
}

#[test]
fn run_steady_equals_stepping_one_at_a_time() {
    let coasted: usize = (0..60).map(run).sum();
    assert!(coasted > 1000, "the random runs coast: {coasted} steps");
}

#[test]
fn outlook_is_zero_between_schedule_and_commit() {
    let mut s = Scheduler::new(Config::default()).expect("config");
    s.add_request(RequestParams {
        request_id: "a".into(),
        prompt_token_ids: vec![1, 2, 3],
        max_tokens: 100,
        ignore_eos: true,
        ..RequestParams::default()
    })
    .expect("add");
    for _ in 0..3 {
        let plan = s.schedule().expect("schedule");
        assert_eq!(s.steady_outlook(TOKEN, 100).steps, 0);
        assert_eq!(s.run_steady(10, TOKEN), 0);
        s.commit(plan.id, &[TOKEN]).expect("commit");
    }
    // Steady now: a 3-token prompt plus 3 tokens, 100 to make; the last may stop it.
    let k = s.steady_outlook(TOKEN, 1000).steps;
    assert!(k > 0 && k < 100);
    assert_eq!(s.run_steady(k, TOKEN), k);
    assert_eq!(s.steady_outlook(TOKEN, 1000).steps, 0);
}
