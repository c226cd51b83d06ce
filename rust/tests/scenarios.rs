//! Hand-written scenarios over random token ids: prefix reuse, copy-on-write, chunked
//! prefill, each preemption mode, priorities, admission control and error paths.

mod common;

use std::collections::HashMap;

use common::{fingerprint, reference, Rng, Sim};
use kvserve_core::metrics::MetricValue;
use kvserve_core::{Config, CoreError, PreemptionMode, RequestParams, Scheduler};

fn metric(s: &Scheduler, k: &str) -> u64 {
    match s
        .metrics()
        .into_iter()
        .find(|(n, _)| *n == k)
        .map(|(_, v)| v)
    {
        Some(MetricValue::Int(i)) => i,
        other => panic!("metric {k}: {other:?}"),
    }
}

fn req(id: &str, prompt: Vec<i64>, max_tokens: usize) -> RequestParams {
    RequestParams {
        request_id: id.into(),
        prompt_token_ids: prompt,
        max_tokens,
        ..Default::default()
    }
}

fn tokens(rng: &mut Rng, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| rng.below(common::VOCAB as u64) as i64)
        .collect()
}

fn cfg(blocks: usize, bs: usize) -> Config {
    Config {
        num_gpu_blocks: blocks,
        block_size: bs,
        watermark: 0.0,
        ..Config::default()
    }
}

/// Runs until idle; returns each request's outputs.
fn drain(s: &mut Scheduler, sim: &mut Sim) -> HashMap<String, Vec<i64>> {
    let mut out = HashMap::new();
    for _ in 0..10_000 {
        if !s.has_unfinished() {
            break;
        }
        sim.step(s);
        s.check_invariants().unwrap();
    }
    assert!(!s.has_unfinished(), "did not drain");
    for (h, id) in &sim.ids {
        let st = s.request_stats(id).unwrap();
        out.insert(id.clone(), sim.tokens[h][st.prompt_tokens..].to_vec());
    }
    out
}

#[test]
fn two_turn_conversation_reuses_first_turn_blocks() {
    let mut rng = Rng::new(1);
    let mut s = Scheduler::new(cfg(64, 4)).unwrap();
    let mut sim = Sim::new(64, 0, 4);
    let turn1 = tokens(&mut rng, 22);
    sim.add(&mut s, req("t1", turn1.clone(), 6)).unwrap();
    drain(&mut s, &mut sim);
    let h1 = *sim.ids.iter().find(|(_, v)| *v == "t1").unwrap().0;
    let history = sim.tokens[&h1].clone(); // prompt + answer (28 tokens)
    let mut turn2 = history.clone();
    turn2.extend(tokens(&mut rng, 7));
    let hits_before = metric(&s, "prefix_hits_tokens");
    sim.add(&mut s, req("t2", turn2.clone(), 4)).unwrap();
    sim.step(&mut s);
    // All full blocks of the history that were computed (27 tokens -> 6 blocks) are hit.
    let cached = s.request_stats("t2").unwrap().cached_prompt_tokens;
    assert_eq!(cached, (history.len() - 1) / 4 * 4);
    assert_eq!(
        metric(&s, "prefix_hits_tokens") - hits_before,
        cached as u64
    );
    let out = drain(&mut s, &mut sim);
    let p2 = req("t2", turn2, 4);
    assert_eq!(out["t2"], reference(&p2, 4096).0);
}

#[test]
fn whole_prompt_hit_copies_last_block_and_recomputes_one_token() {
    let mut rng = Rng::new(2);
    let mut s = Scheduler::new(cfg(32, 8)).unwrap();
    let mut sim = Sim::new(32, 0, 8);
    let prompt = tokens(&mut rng, 32); // exactly 4 full blocks
    sim.add(&mut s, req("a", prompt.clone(), 1)).unwrap();
    drain(&mut s, &mut sim);
    sim.add(&mut s, req("b", prompt.clone(), 3)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(
        plan.num_tokens, 1,
        "only the final prompt token is recomputed"
    );
    assert_eq!(plan.positions, vec![31]);
    assert_eq!(
        plan.copies.len(),
        2,
        "one copy-on-write of the last cached block"
    );
    let (src, dst) = (plan.copies[0], plan.copies[1]);
    assert_ne!(src, dst);
    assert_eq!(s.block_table()[3] as i64, dst);
    assert_eq!(plan.slot_mapping[0], dst * 8 + 7);
    let sampled = sim.execute(&s, &plan);
    sim.commit(&mut s, &plan, &sampled);
    assert_eq!(s.request_stats("b").unwrap().cached_prompt_tokens, 31);
    let out = drain(&mut s, &mut sim);
    assert_eq!(out["b"], reference(&req("b", prompt, 3), 4096).0);
}

#[test]
fn chunked_prefill_of_a_prompt_ten_times_the_budget() {
    let mut rng = Rng::new(3);
    let budget = 16;
    let c = Config {
        max_num_batched_tokens: budget,
        ..cfg(64, 4)
    };
    let mut s = Scheduler::new(c).unwrap();
    let mut sim = Sim::new(64, 0, 4);
    let prompt = tokens(&mut rng, 10 * budget);
    sim.add(&mut s, req("long", prompt.clone(), 3)).unwrap();
    sim.add(&mut s, req("short", tokens(&mut rng, 5), 30))
        .unwrap();
    let mut chunks = 0;
    loop {
        let plan = s.schedule().unwrap();
        assert!(plan.num_tokens <= budget);
        let long_rows = plan.handles.iter().position(|&h| h == 0);
        let sampled = sim.execute(&s, &plan);
        sim.commit(&mut s, &plan, &sampled);
        if let Some(i) = long_rows {
            let n = plan.query_start_loc[i + 1] - plan.query_start_loc[i];
            if plan.sample_handles.contains(&0) {
                chunks += 1;
                break;
            }
            assert!(n >= 1);
            chunks += 1;
        }
    }
    assert_eq!(chunks, 10, "160 tokens in budget-16 chunks is 10 steps");
    let out = drain(&mut s, &mut sim);
    assert_eq!(out["long"], reference(&req("long", prompt, 3), 4096).0);
}

/// Many requests through a pool far too small for all of them, in each preemption mode,
/// give exactly the tokens of the same run on a pool that never preempts.
fn preemption_run(
    mode: PreemptionMode,
    blocks: usize,
    host: usize,
) -> (HashMap<String, Vec<i64>>, Scheduler) {
    let mut rng = Rng::new(4);
    let c = Config {
        num_gpu_blocks: blocks,
        block_size: 4,
        num_host_blocks: host,
        preemption_mode: mode,
        max_num_batched_tokens: 64,
        max_num_seqs: 8,
        watermark: 0.0,
        kv_bytes_per_token: 1,
        flops_per_token: 1e9,
        ..Config::default()
    };
    let mut s = Scheduler::new(c).unwrap();
    let mut sim = Sim::new(blocks, host, 4);
    for i in 0..8 {
        let n = rng.range(5, 20) as usize;
        let p = RequestParams {
            ignore_eos: true,
            ..req(&format!("r{i}"), tokens(&mut rng, n), 30)
        };
        sim.add(&mut s, p).unwrap();
    }
    let out = drain(&mut s, &mut sim);
    (out, s)
}

#[test]
fn preemption_in_each_mode_restores_identical_streams() {
    let (want, big) = preemption_run(PreemptionMode::Recompute, 512, 0);
    assert_eq!(metric(&big, "preemptions"), 0);
    for (mode, host) in [
        (PreemptionMode::Recompute, 0),
        (PreemptionMode::Swap, 64),
        (PreemptionMode::Auto, 64),
    ] {
        let (got, s) = preemption_run(mode, 14, host);
        assert_eq!(got, want, "{mode:?}");
        let (r, w) = (
            metric(&s, "preemptions_recompute"),
            metric(&s, "preemptions_swap"),
        );
        match mode {
            PreemptionMode::Recompute => {
                assert!(r > 0 && w == 0);
                assert!(metric(&s, "recomputed_tokens") > 0);
            }
            // With 1 byte/token vs 1 GFLOP/token, swapping is far cheaper than recompute.
            PreemptionMode::Swap | PreemptionMode::Auto => {
                assert!(w > 0 && r == 0, "{mode:?}: {r} recompute, {w} swap");
                assert_eq!(
                    metric(&s, "swapped_in_blocks"),
                    metric(&s, "swapped_out_blocks")
                );
            }
        }
    }
}

#[test]
fn auto_prefers_recompute_when_swapping_costs_more_and_swap_falls_back_without_host_room() {
    let mut rng = Rng::new(5);
    let c = Config {
        num_gpu_blocks: 10,
        block_size: 4,
        num_host_blocks: 64,
        preemption_mode: PreemptionMode::Auto,
        kv_bytes_per_token: 1 << 30, // 1 GiB per token over PCIe: recompute wins
        flops_per_token: 1.0,
        watermark: 0.0,
        ..Config::default()
    };
    let mut s = Scheduler::new(c.clone()).unwrap();
    let mut sim = Sim::new(10, 64, 4);
    for i in 0..4 {
        sim.add(
            &mut s,
            RequestParams {
                ignore_eos: true,
                ..req(&format!("r{i}"), tokens(&mut rng, 9), 20)
            },
        )
        .unwrap();
    }
    drain(&mut s, &mut sim);
    assert!(metric(&s, "preemptions_recompute") > 0);
    assert_eq!(metric(&s, "preemptions_swap"), 0);

    // Swap mode with a host pool too small to hold a victim recomputes instead.
    let c = Config {
        preemption_mode: PreemptionMode::Swap,
        num_host_blocks: 1,
        ..c
    };
    let mut s = Scheduler::new(c).unwrap();
    let mut sim = Sim::new(10, 1, 4);
    for i in 0..4 {
        sim.add(
            &mut s,
            RequestParams {
                ignore_eos: true,
                ..req(&format!("r{i}"), tokens(&mut rng, 9), 20)
            },
        )
        .unwrap();
    }
    drain(&mut s, &mut sim);
    assert!(metric(&s, "preemptions_recompute") > 0);
}

#[test]
fn victim_is_lowest_priority_latest_arrival_and_swapped_resume_before_new() {
    let mut rng = Rng::new(6);
    let c = Config {
        num_gpu_blocks: 8,
        block_size: 4,
        num_host_blocks: 16,
        preemption_mode: PreemptionMode::Swap,
        watermark: 0.0,
        ..Config::default()
    };
    let mut s = Scheduler::new(c).unwrap();
    let mut sim = Sim::new(8, 16, 4);
    let p = |id: &str, prio: i64, rng: &mut Rng| RequestParams {
        priority: prio,
        ignore_eos: true,
        ..req(id, tokens(rng, 7), 20)
    };
    sim.add(&mut s, p("low", 1, &mut rng)).unwrap();
    sim.add(&mut s, p("high", 0, &mut rng)).unwrap();
    sim.add(&mut s, p("high2", 0, &mut rng)).unwrap();
    let mut first_swapped = None;
    for _ in 0..200 {
        if !s.has_unfinished() {
            break;
        }
        sim.step(&mut s);
        if first_swapped.is_none() && s.num_swapped() > 0 {
            first_swapped = ["low", "high", "high2"].into_iter().find(|id| {
                s.request_stats(id)
                    .map(|st| st.state == "swapped")
                    .unwrap_or(false)
            });
        }
    }
    assert_eq!(
        first_swapped,
        Some("low"),
        "priority 1 is preempted before priority 0"
    );

    // A swapped request resumes before a newly arrived one is admitted.
    let mut s = Scheduler::new(Config {
        num_gpu_blocks: 7,
        ..s.config().clone()
    })
    .unwrap();
    let mut sim = Sim::new(7, 16, 4);
    sim.add(&mut s, p("a", 0, &mut rng)).unwrap();
    sim.add(&mut s, p("b", 0, &mut rng)).unwrap();
    while s.num_swapped() == 0 {
        sim.step(&mut s);
    }
    sim.add(&mut s, p("c", 0, &mut rng)).unwrap();
    while s.num_swapped() > 0 {
        assert_eq!(
            s.request_stats("c").unwrap().state,
            "waiting",
            "c admitted before the swapped one"
        );
        sim.step(&mut s);
    }
    drain(&mut s, &mut sim);
}

#[test]
fn lru_evicts_least_recent_and_counts_recomputed_tokens() {
    let mut rng = Rng::new(7);
    let mut s = Scheduler::new(cfg(8, 4)).unwrap();
    let mut sim = Sim::new(8, 0, 4);
    let a = tokens(&mut rng, 9); // 2 full blocks + 1
    sim.add(&mut s, req("a", a.clone(), 1)).unwrap();
    drain(&mut s, &mut sim);
    assert_eq!(s.gpu_pool().num_cached(), 2);
    // Fill the pool so that a's cached blocks are evicted.
    sim.add(&mut s, req("b", tokens(&mut rng, 30), 1)).unwrap();
    drain(&mut s, &mut sim);
    assert!(metric(&s, "evictions") >= 2);
    let before = metric(&s, "recomputed_tokens");
    sim.add(&mut s, req("a2", a, 1)).unwrap();
    drain(&mut s, &mut sim);
    assert_eq!(s.request_stats("a2").unwrap().cached_prompt_tokens, 0);
    assert_eq!(
        metric(&s, "recomputed_tokens") - before,
        8,
        "two evicted blocks recomputed"
    );
}

#[test]
fn salts_never_share_blocks() {
    let mut rng = Rng::new(8);
    let mut s = Scheduler::new(cfg(32, 4)).unwrap();
    let mut sim = Sim::new(32, 0, 4);
    let prompt = tokens(&mut rng, 13);
    let salted = |id: &str, salt: Option<&str>| RequestParams {
        cache_salt: salt.map(String::from),
        ..req(id, prompt.clone(), 1)
    };
    sim.add(&mut s, salted("x", Some("tenant-a"))).unwrap();
    drain(&mut s, &mut sim);
    for (id, salt, want) in [
        ("y", Some("tenant-b"), 0),
        ("z", None, 0),
        ("w", Some("tenant-a"), 12),
    ] {
        sim.add(&mut s, salted(id, salt)).unwrap();
        drain(&mut s, &mut sim);
        assert_eq!(
            s.request_stats(id).unwrap().cached_prompt_tokens,
            want,
            "{id}"
        );
    }
}

#[test]
fn errors_name_the_field_and_change_nothing() {
    let c = Config {
        max_model_len: 64,
        max_waiting: 2,
        ..cfg(8, 4)
    };
    let mut s = Scheduler::new(c).unwrap();
    s.add_request(req("ok", vec![1, 2, 3], 4)).unwrap();
    let fp = fingerprint(&s);
    let cases: Vec<(RequestParams, &str)> = vec![
        (req("e", vec![], 4), "prompt_token_ids"),
        (req("e", vec![1; 64], 4), "prompt_token_ids"),
        (req("e", vec![1, -2], 4), "prompt_token_ids"),
        (req("ok", vec![1], 4), "request_id"),
        (req("", vec![1], 4), "request_id"),
        (req("e", vec![1], 0), "max_tokens"),
        (
            RequestParams {
                min_tokens: 5,
                ..req("e", vec![1], 4)
            },
            "min_tokens",
        ),
    ];
    for (p, field) in cases {
        let e = s.add_request(p).unwrap_err();
        assert!(
            matches!(e, CoreError::InvalidRequest { field: f, .. } if f == field),
            "{e}"
        );
        assert_eq!(fp, fingerprint(&s));
    }
    // Requests that could never run alone (8 blocks of 4 = 32 KV slots) get their own
    // variant (still a bad request), naming the field to shrink.
    let too_large: Vec<(RequestParams, &str)> = vec![
        (req("e", vec![1; 20], 40), "max_tokens"), // 20 + 40 - 1 = 59 slots
        (req("e", vec![1; 33], 1), "prompt_token_ids"), // the prompt alone needs 9 blocks
    ];
    for (p, field) in too_large {
        let e = s.add_request(p).unwrap_err();
        assert!(
            matches!(e, CoreError::RequestTooLarge { field: f, .. } if f == field),
            "{e}"
        );
        assert!(e.is_invalid_request());
        assert!(e.to_string().contains("could never run"), "{e}");
        assert_eq!(fp, fingerprint(&s));
    }
    s.add_request(req("ok2", vec![1], 4)).unwrap();
    let fp = fingerprint(&s);
    assert!(matches!(
        s.add_request(req("third", vec![1], 4)),
        Err(CoreError::AtCapacity { .. })
    ));
    assert_eq!(fp, fingerprint(&s));
    assert!(s.request("third").is_none());
    assert!(s.abort("nope").is_none());
    s.check_invariants().unwrap();
    for (c, field) in [
        (
            Config {
                block_size: 3,
                ..cfg(8, 4)
            },
            "block_size",
        ),
        (
            Config {
                block_size: 512,
                ..cfg(8, 4)
            },
            "block_size",
        ),
        (
            Config {
                num_gpu_blocks: 0,
                ..cfg(8, 4)
            },
            "num_gpu_blocks",
        ),
        (
            Config {
                max_num_batched_tokens: 0,
                ..cfg(8, 4)
            },
            "max_num_batched_tokens",
        ),
    ] {
        let e = Scheduler::new(c).unwrap_err();
        assert!(
            matches!(e, CoreError::Config { field: f, .. } if f == field),
            "{e}"
        );
    }
}

#[test]
fn stop_conditions_through_commit() {
    let mut s = Scheduler::new(cfg(16, 4)).unwrap();
    let p = RequestParams {
        stop_token_ids: vec![5],
        eos_token_id: Some(9),
        min_tokens: 2,
        ..req("s", vec![1, 2, 3], 10)
    };
    s.add_request(p).unwrap();
    let step = |s: &mut Scheduler, t: i64| {
        let plan = s.schedule().unwrap();
        s.commit(plan.id, &[t]).unwrap()
    };
    assert!(
        step(&mut s, 9).finished_ids.is_empty(),
        "eos before min_tokens is kept going"
    );
    assert!(step(&mut s, 7).finished_ids.is_empty());
    let out = step(&mut s, 5);
    assert_eq!(out.finished_ids, vec!["s".to_string()]);
    assert_eq!(out.finish_reasons, vec!["stop"]);
    assert_eq!(s.gpu_pool().num_used(), 0);
    assert_eq!(s.request_stats("s").unwrap().output_tokens, 3);
    // max_model_len ends a request with "length".
    let mut s = Scheduler::new(Config {
        max_model_len: 6,
        ..cfg(16, 4)
    })
    .unwrap();
    s.add_request(req("m", vec![1, 2, 3, 4], 100)).unwrap();
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let plan = s.schedule().unwrap();
        if plan.num_seqs == 0 {
            break;
        }
        reasons.extend(s.commit(plan.id, &[1]).unwrap().finish_reasons);
    }
    assert_eq!(reasons, vec!["length"]);
    assert_eq!(s.request_stats("m").unwrap().output_tokens, 2);
}

#[test]
fn watermark_holds_back_admissions_but_never_starves_an_idle_core() {
    let c = Config {
        watermark: 0.5,
        max_num_batched_tokens: 1024,
        ..cfg(8, 4)
    };
    let mut s = Scheduler::new(c).unwrap();
    s.add_request(req("big", vec![1; 24], 4)).unwrap(); // 6 of 8 blocks
    s.add_request(req("small", vec![2; 3], 4)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(
        plan.num_seqs, 1,
        "idle core admits despite the watermark; the next waits"
    );
    s.commit(plan.id, &[1]).unwrap();
    s.check_invariants().unwrap();
}

/// Ends `id` (adds it and finishes it at once).
fn end_request(s: &mut Scheduler, id: &str) {
    s.add_request(req(id, vec![1, 2], 4)).unwrap();
    assert!(s.finish(id, "stop").is_some());
}

#[test]
fn request_stats_remembers_a_reused_id_from_its_latest_end() {
    // The repro: "x" ends, 4095 others end, "x" ends again, then "y".
    let mut s = Scheduler::new(cfg(16, 4)).unwrap();
    end_request(&mut s, "x");
    for i in 0..4095 {
        end_request(&mut s, &format!("o{i}"));
    }
    end_request(&mut s, "x");
    end_request(&mut s, "y");
    assert!(s.request_stats("x").is_ok(), "x ended second to last");
    assert!(s.request_stats("o1").is_ok());
    assert_eq!(
        s.request_stats("o0"),
        Err(CoreError::UnknownRequest("o0".into())),
        "o0 is the oldest of 4097 distinct ended ids"
    );
}

#[test]
fn request_stats_remembers_the_last_4096_distinct_ended_ids() {
    // Reference: ids in the order of their latest end; the last 4096 are remembered.
    const MEMORY: usize = 4096;
    let mut rng = Rng::new(11);
    let mut s = Scheduler::new(cfg(16, 4)).unwrap();
    let mut latest_end: Vec<String> = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for round in 0..12_000 {
        // Mostly fresh ids, often a few hot ones ended again and again.
        let id = if rng.chance(0.4) {
            format!("hot{}", rng.below(8))
        } else if rng.chance(0.2) && !used.is_empty() {
            used[rng.below(used.len() as u64) as usize].clone()
        } else {
            format!("fresh{round}")
        };
        end_request(&mut s, &id);
        latest_end.retain(|x| *x != id);
        latest_end.push(id.clone());
        if !used.contains(&id) {
            used.push(id);
        }
        if round % 3000 == 2999 {
            let keep = latest_end.len().saturating_sub(MEMORY);
            for (i, x) in latest_end.iter().enumerate() {
                assert_eq!(
                    s.request_stats(x).is_ok(),
                    i >= keep,
                    "round {round}: {x} ended {} ends ago",
                    latest_end.len() - i
                );
            }
        }
    }
    s.check_invariants().unwrap();
}

/// Host prefix tier: a finished prompt's blocks are offloaded by a copy-only plan that must
/// be committed, survive the GPU evicting them, and come back by loads on the next turn;
/// the tokens equal the reference and nothing leaks.
#[test]
fn host_tier_offloads_idle_blocks_and_loads_them_back() {
    let mut rng = Rng::new(77);
    let c = Config {
        num_host_blocks: 64,
        host_prefix_cache: true,
        kv_bytes_per_token: 64,
        flops_per_token: 1e9,
        preemption_mode: PreemptionMode::Recompute,
        ..cfg(10, 4)
    };
    let mut s = Scheduler::new(c.clone()).unwrap();
    let mut sim = Sim::new(c.num_gpu_blocks, c.num_host_blocks, c.block_size);
    let first = tokens(&mut rng, 24);
    sim.add(&mut s, req("first", first.clone(), 1)).unwrap();
    sim.step(&mut s); // prefill, sample, finish: 6 full blocks go idle
    let plan = s.schedule().unwrap();
    assert_eq!((plan.num_seqs, plan.offloads.len() / 2), (0, 6));
    assert!(plan.must_commit());
    assert!(matches!(s.schedule(), Err(CoreError::StalePlan { .. })));
    sim.execute(&s, &plan);
    sim.commit(&mut s, &plan, &[]);
    assert_eq!(s.num_host_cached_blocks(), 6);
    // Another prompt takes the whole GPU pool: the first one's GPU blocks are evicted.
    sim.add(&mut s, req("other", tokens(&mut rng, 40), 1))
        .unwrap();
    drain(&mut s, &mut sim);
    let mut turn2 = first.clone();
    turn2.extend(tokens(&mut rng, 5));
    sim.add(&mut s, req("turn2", turn2.clone(), 3)).unwrap();
    // The other prompt's 10 blocks just went idle: they are offloaded first, pinned until
    // the copy is done, so turn2 waits one step for blocks instead of dropping them.
    let plan = s.schedule().unwrap();
    assert_eq!((plan.num_seqs, plan.offloads.len() / 2), (0, 10));
    sim.execute(&s, &plan);
    sim.commit(&mut s, &plan, &[]);
    s.check_invariants().unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(
        plan.loads.len() / 2,
        6,
        "the first prompt's blocks come from the host"
    );
    assert_eq!(plan.num_tokens, 5, "only the new tokens are computed");
    let sampled = sim.execute(&s, &plan);
    sim.commit(&mut s, &plan, &sampled);
    s.check_invariants().unwrap();
    let outs = drain(&mut s, &mut sim);
    assert_eq!(
        outs["turn2"],
        reference(&req("turn2", turn2, 3), c.max_model_len).0
    );
    assert_eq!(metric(&s, "prefix_hits_host_tokens"), 24);
    assert_eq!(metric(&s, "host_loaded_blocks"), 6);
    assert_eq!(metric(&s, "host_load_decisions"), 1);
    assert_eq!(metric(&s, "recomputed_tokens"), 0);
    assert_eq!((s.gpu_pool().num_used(), s.host_pool().num_used()), (0, 0));
}
