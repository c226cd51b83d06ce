//! Random add / schedule / commit / abort / finish sequences over small pools, with
//! forced preemption. After every operation the core's invariants hold; every plan is
//! executed on a simulated KV cache that checks each context reads back intact; every
//! request that ends by itself produced exactly the reference model's tokens.

mod common;

use std::collections::HashMap;

use common::{fingerprint, reference, Rng, Sim};
use kvserve_core::{Config, CoreError, PreemptionMode, RequestParams, Scheduler};
use proptest::prelude::*;

fn random_config(rng: &mut Rng) -> Config {
    let block_size = 1usize << rng.range(0, 4); // 1..16
    let mode = match rng.below(3) {
        0 => PreemptionMode::Recompute,
        1 => PreemptionMode::Swap,
        _ => PreemptionMode::Auto,
    };
    let num_host_blocks = match mode {
        PreemptionMode::Swap => rng.range(1, 48) as usize,
        _ => rng.range(0, 48) as usize,
    };
    let enable_prefix_caching = rng.chance(0.8);
    Config {
        num_gpu_blocks: rng.range(4, 48) as usize,
        block_size,
        num_host_blocks,
        max_num_seqs: rng.range(1, 8) as usize,
        max_num_batched_tokens: rng.range(1, 64) as usize,
        max_model_len: rng.range(8, 96) as usize,
        max_waiting: rng.range(1, 16) as usize,
        enable_prefix_caching,
        preemption_mode: mode,
        watermark: [0.0, 0.01, 0.1][rng.below(3) as usize],
        kv_bytes_per_token: rng.range(0, 4096),
        flops_per_token: [0.0, 1e6, 1e9][rng.below(3) as usize],
        swap_bytes_per_s: 25e9,
        prefill_flops_per_s: 1e14,
        host_prefix_cache: enable_prefix_caching && num_host_blocks > 0 && rng.chance(0.6),
        // Loads pay when KV bytes are few and FLOPs many; both ways are drawn.
        load_bytes_per_s: [1e6, 25e9][rng.below(2) as usize],
        ..Config::default()
    }
}

/// A request that usually fits; prompts often share prefixes (and sometimes a salt).
fn random_request(rng: &mut Rng, id: String, cfg: &Config, bases: &[Vec<i64>]) -> RequestParams {
    let max_len = cfg.max_model_len;
    let plen = rng.range(1, (max_len as u64 - 1).min(40)) as usize;
    let mut prompt: Vec<i64> = if rng.chance(0.6) {
        let base = &bases[rng.below(bases.len() as u64) as usize];
        base.iter().copied().take(plen).collect()
    } else {
        Vec::new()
    };
    while prompt.len() < plen {
        prompt.push(rng.below(common::VOCAB as u64) as i64);
    }
    let max_tokens = rng.range(1, 24) as usize;
    RequestParams {
        request_id: id,
        prompt_token_ids: prompt,
        max_tokens,
        min_tokens: rng.below(max_tokens as u64 + 1) as usize,
        stop_token_ids: (0..rng.below(3))
            .map(|_| rng.below(common::VOCAB as u64) as i64)
            .collect(),
        eos_token_id: if rng.chance(0.5) {
            Some(rng.below(common::VOCAB as u64) as i64)
        } else {
            None
        },
        ignore_eos: rng.chance(0.2),
        priority: rng.below(3) as i64,
        cache_salt: if rng.chance(0.15) {
            Some(format!("tenant{}", rng.below(2)))
        } else {
            None
        },
    }
}

#[derive(Default, Debug)]
struct Totals {
    ops: u64,
    finished: u64,
    preempt_recompute: u64,
    preempt_swap: u64,
    prefix_hits: u64,
    cow: u64,
    rejected: u64,
    errors_checked: u64,
    copy_failures: u64,
    host_hits: u64,
    host_loads: u64,
    host_offloads: u64,
    host_recompute: u64,
}

/// Runs one random scenario; returns counts for coverage checks.
fn run_scenario(seed: u64, num_ops: usize) -> Totals {
    let mut rng = Rng::new(seed);
    let cfg = random_config(&mut rng);
    let mut s = Scheduler::new(cfg.clone()).expect("valid random config");
    let mut sim = Sim::new(cfg.num_gpu_blocks, cfg.num_host_blocks, cfg.block_size);
    let bases: Vec<Vec<i64>> = (0..3)
        .map(|_| {
            (0..96)
                .map(|_| rng.below(common::VOCAB as u64) as i64)
                .collect()
        })
        .collect();
    let mut params: HashMap<String, RequestParams> = HashMap::new();
    let mut ended_early: Vec<String> = Vec::new();
    let mut live: Vec<String> = Vec::new();
    let mut next_id = 0u64;
    let mut t = Totals::default();
    let check_done = |done: Vec<(String, &'static str)>,
                      sim: &Sim,
                      params: &HashMap<String, RequestParams>,
                      live: &mut Vec<String>,
                      t: &mut Totals| {
        for (id, reason) in done {
            let p = &params[&id];
            let h = *sim
                .ids
                .iter()
                .find(|(_, v)| **v == id)
                .map(|(h, _)| h)
                .expect("id");
            let got = &sim.tokens[&h][p.prompt_token_ids.len()..];
            let (want, want_reason) = reference(p, cfg.max_model_len);
            assert_eq!(
                got,
                &want[..],
                "seed {seed}: request {id} tokens differ from reference"
            );
            assert_eq!(
                reason, want_reason,
                "seed {seed}: request {id} finish reason"
            );
            live.retain(|x| *x != id);
            t.finished += 1;
        }
    };

    for _ in 0..num_ops {
        t.ops += 1;
        match rng.below(100) {
            0..=29 => {
                let id = format!("r{next_id}");
                next_id += 1;
                let p = random_request(&mut rng, id.clone(), &cfg, &bases);
                let before = fingerprint(&s);
                match sim.add(&mut s, p.clone()) {
                    Ok(_) => {
                        params.insert(id.clone(), p);
                        live.push(id);
                    }
                    Err(CoreError::AtCapacity { .. })
                    | Err(CoreError::InvalidRequest { .. })
                    | Err(CoreError::RequestTooLarge { .. }) => {
                        t.rejected += 1;
                        assert_eq!(before, fingerprint(&s), "a rejected add changed the core");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            30..=84 => {
                let done = sim.step(&mut s);
                check_done(done, &sim, &params, &mut live, &mut t);
            }
            85..=86 if cfg.host_prefix_cache => {
                // The runner could not complete a plan's host-tier copies (found before the
                // commit; what they wrote is junk): the core ends exactly the requests that
                // needed its loads, and the other rows commit as usual.
                let plan = s.schedule().expect("schedule");
                let sampled = sim.execute(&s, &plan);
                sim.corrupt_tier_copies(&plan);
                let loaders: Vec<String> = plan
                    .handles
                    .iter()
                    .filter(|&&h| {
                        let blocks = s.request(&sim.ids[&h]).map(|r| r.blocks.clone());
                        let blocks = blocks.unwrap_or_default();
                        plan.loads
                            .chunks(2)
                            .any(|pr| blocks.contains(&(pr[1] as u32)))
                    })
                    .map(|h| sim.ids[h].clone())
                    .collect();
                let mut failed = s.fail_copies(plan.id).expect("fail_copies");
                failed.sort();
                let mut want = loaders;
                want.sort();
                assert_eq!(failed, want, "seed {seed}: ended requests");
                for id in &failed {
                    live.retain(|x| x != id);
                    ended_early.push(id.clone());
                }
                s.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                let done = sim.commit(&mut s, &plan, &sampled);
                check_done(done, &sim, &params, &mut live, &mut t);
                t.copy_failures += 1;
            }
            85..=89 if !live.is_empty() => {
                // abort or finish between schedule and commit
                let plan = s.schedule().expect("schedule");
                let sampled = sim.execute(&s, &plan);
                let id = live.swap_remove(rng.below(live.len() as u64) as usize);
                if rng.chance(0.5) {
                    assert!(s.abort(&id).is_some());
                } else {
                    assert!(s.finish(&id, "stop_string").is_some());
                }
                ended_early.push(id);
                let done = sim.commit(&mut s, &plan, &sampled);
                check_done(done, &sim, &params, &mut live, &mut t);
            }
            90..=93 if !live.is_empty() => {
                let id = live.swap_remove(rng.below(live.len() as u64) as usize);
                assert!(s.abort(&id).is_some());
                assert!(s.abort(&id).is_none(), "second abort is a no-op");
                ended_early.push(id);
            }
            94..=96 => {
                // Bad inputs must leave everything as it was.
                let before = fingerprint(&s);
                let plan = s.schedule().expect("schedule");
                let sampled = sim.execute(&s, &plan);
                let mid = fingerprint(&s);
                let mut wrong = sampled.clone();
                wrong.push(1);
                assert!(matches!(
                    s.commit(plan.id, &wrong),
                    Err(CoreError::InvalidRequest { .. })
                ));
                assert!(matches!(
                    s.commit(plan.id + 1, &sampled),
                    Err(CoreError::StalePlan { .. })
                ));
                if plan.num_seqs > 0 {
                    assert!(matches!(s.schedule(), Err(CoreError::StalePlan { .. })));
                }
                let bad = RequestParams {
                    request_id: "bad".into(),
                    max_tokens: 1,
                    ..Default::default()
                };
                assert!(s.add_request(bad).is_err());
                if let Some(id) = live.first() {
                    let dup = RequestParams {
                        request_id: id.clone(),
                        prompt_token_ids: vec![1],
                        max_tokens: 1,
                        ..Default::default()
                    };
                    assert!(matches!(
                        s.add_request(dup),
                        Err(CoreError::InvalidRequest { .. })
                    ));
                }
                assert_eq!(mid, fingerprint(&s));
                s.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                let done = sim.commit(&mut s, &plan, &sampled);
                assert!(matches!(
                    s.commit(plan.id, &sampled),
                    Err(CoreError::StalePlan { .. })
                ));
                check_done(done, &sim, &params, &mut live, &mut t);
                let _ = before;
                t.errors_checked += 1;
            }
            _ => {
                assert!(s.abort("no-such-request").is_none());
            }
        }
        s.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }

    // Drain: every request must finish by itself, in bounded steps.
    let mut steps = 0;
    while s.has_unfinished() {
        let done = sim.step(&mut s);
        check_done(done, &sim, &params, &mut live, &mut t);
        s.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        steps += 1;
        t.ops += 1;
        assert!(
            steps < 20_000,
            "seed {seed}: requests never finished: {:?}",
            live
        );
    }
    assert!(
        live.is_empty(),
        "seed {seed}: {live:?} never reported finished"
    );
    let m: HashMap<&str, _> = s.metrics().into_iter().collect();
    let int = |k: &str| match m[k] {
        kvserve_core::metrics::MetricValue::Int(i) => i,
        kvserve_core::metrics::MetricValue::Float(_) => 0,
    };
    assert_eq!(int("gpu_blocks_used"), 0, "seed {seed}: blocks leaked");
    assert_eq!(
        int("host_blocks_used"),
        0,
        "seed {seed}: host blocks leaked"
    );
    t.preempt_recompute = int("preemptions_recompute");
    t.preempt_swap = int("preemptions_swap");
    t.prefix_hits = int("prefix_hits_tokens");
    t.cow = int("cow_copies");
    t.host_hits = int("prefix_hits_host_tokens");
    t.host_loads = int("host_loaded_blocks");
    t.host_offloads = int("host_offloaded_blocks");
    t.host_recompute = int("host_recompute_decisions");
    assert_eq!(
        int("prefix_hits_gpu_tokens") + int("prefix_hits_host_tokens"),
        int("prefix_hits_tokens"),
        "seed {seed}: hits by tier"
    );
    if !cfg.host_prefix_cache {
        assert_eq!(t.host_offloads + t.host_loads, 0, "seed {seed}: tier off");
    }
    t
}

/// The bulk of the random operations: fixed seeds, so a failure names its seed.
#[test]
fn random_operations_keep_invariants_and_reference_tokens() {
    let mut total = Totals::default();
    for seed in 0..220u64 {
        let t = run_scenario(seed, 480);
        total.ops += t.ops;
        total.finished += t.finished;
        total.preempt_recompute += t.preempt_recompute;
        total.preempt_swap += t.preempt_swap;
        total.prefix_hits += t.prefix_hits;
        total.cow += t.cow;
        total.rejected += t.rejected;
        total.errors_checked += t.errors_checked;
        total.copy_failures += t.copy_failures;
        total.host_hits += t.host_hits;
        total.host_loads += t.host_loads;
        total.host_offloads += t.host_offloads;
        total.host_recompute += t.host_recompute;
    }
    eprintln!("{total:?}");
    assert!(total.ops >= 100_000, "only {} random operations", total.ops);
    // The random runs must actually reach the interesting paths.
    assert!(total.preempt_recompute > 50, "{total:?}");
    assert!(total.preempt_swap > 50, "{total:?}");
    assert!(total.prefix_hits > 1000, "{total:?}");
    assert!(total.cow > 10, "{total:?}");
    // Both tiers: offloads, loads (hits served from host memory), recompute decisions
    // and failed copies all happen.
    assert!(total.host_offloads > 1000, "{total:?}");
    assert!(total.host_loads > 100 && total.host_hits > 100, "{total:?}");
    assert!(total.host_recompute > 10, "{total:?}");
    assert!(total.copy_failures > 10, "{total:?}");
    assert!(
        total.rejected > 10 && total.errors_checked > 100,
        "{total:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Same property through proptest (shrinks the seed and length on failure).
    #[test]
    fn proptest_random_operations(seed in 1_000u64..u64::MAX / 2, ops in 1usize..300) {
        run_scenario(seed, ops);
    }
}
