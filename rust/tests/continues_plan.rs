//! `Plan::continues_plan_id` against the comparison the decode run-ahead used to make
//! (python/kvserve/cuda_graphs.py): a step launched ahead from decode-only plan P (its
//! tokens the ones P's commit took, every position and slot one on, P's block table) is
//! the next plan's forward exactly when that plan is decode-only, moves no blocks and has
//! those input ids, positions, slots, lengths and block table. On random workloads, with
//! the steady-batch path on and off, the core's field names P exactly when the comparison
//! matches. `Plan::advances_in_place` likewise against the rule the run-ahead used to
//! apply itself before launching a step ahead.

mod common;

use common::{Rng, Sim};
use kvserve_core::{Config, Plan, PreemptionMode, RequestParams, Scheduler};

/// What a step launched ahead from plan `id` would have run.
struct Ahead {
    id: u64,
    input_ids: Vec<i64>,
    positions: Vec<i64>,
    slot_mapping: Vec<i64>,
    num_seqs: usize,
    max_blocks: usize,
    block_table: Vec<i32>,
}

/// The graphs' `can_run`: every row one decode token, all sampled.
fn decode_only(plan: &Plan) -> bool {
    plan.num_seqs > 0
        && plan.num_decodes == plan.num_seqs
        && plan.num_tokens == plan.num_seqs
        && plan.logits_indices.len() == plan.num_seqs
}

/// The old run-ahead check: the step launched ahead is exactly this plan's forward.
fn old_comparison(a: &Ahead, plan: &Plan, table: &[i32]) -> bool {
    let one_on = |v: &[i64]| v.iter().map(|x| x + 1).collect::<Vec<_>>();
    decode_only(plan)
        && plan.swap_out.is_empty()
        && plan.swap_in.is_empty()
        && plan.copies.is_empty()
        && plan.input_ids == a.input_ids
        && plan.positions == one_on(&a.positions)
        && plan.slot_mapping == one_on(&a.slot_mapping)
        && plan
            .seq_lens
            .iter()
            .zip(&plan.positions)
            .all(|(&l, &p)| i64::from(l) == p + 1)
        && (plan.num_seqs, plan.max_blocks) == (a.num_seqs, a.max_blocks)
        && table == a.block_table
}

/// The old run-ahead precondition: every row's next position in the block it is in and
/// below max_model_len, and the plan moves no blocks.
fn old_may_run_ahead(plan: &Plan, cfg: &Config) -> bool {
    let mask = cfg.block_size as i64 - 1;
    decode_only(plan)
        && plan.swap_out.is_empty()
        && plan.swap_in.is_empty()
        && plan.copies.is_empty()
        && plan
            .positions
            .iter()
            .all(|&p| (p + 1) & mask != 0 && p + 1 < cfg.max_model_len as i64)
}

/// How often each outcome of both comparisons occurred.
#[derive(Default)]
struct Counts {
    matched: u64,
    unmatched: u64,
    in_place: u64,
    not_in_place: u64,
}

fn config(rng: &mut Rng) -> Config {
    Config {
        num_gpu_blocks: rng.range(6, 64) as usize,
        block_size: 1 << rng.range(0, 4),
        num_host_blocks: rng.range(1, 32) as usize,
        max_num_seqs: rng.range(1, 9) as usize,
        max_num_batched_tokens: rng.range(4, 64) as usize,
        max_model_len: rng.range(16, 128) as usize,
        max_waiting: 64,
        enable_prefix_caching: rng.chance(0.7),
        preemption_mode: [
            PreemptionMode::Recompute,
            PreemptionMode::Swap,
            PreemptionMode::Auto,
        ][rng.below(3) as usize],
        watermark: [0.0, 0.05][rng.below(2) as usize],
        kv_bytes_per_token: 64,
        flops_per_token: 1e6,
        ..Config::default()
    }
}

/// Counts of plans that continued the previous one or not, and that advance in place or
/// not (decode-only plans only).
fn run(seed: u64, steady_path: bool, counts: &mut Counts) {
    let mut rng = Rng::new(seed);
    let cfg = config(&mut rng);
    let mut s = Scheduler::new(cfg.clone()).expect("valid config");
    s.set_steady_path(steady_path);
    let mut sim = Sim::new(cfg.num_gpu_blocks, cfg.num_host_blocks, cfg.block_size);
    let mut ahead: Option<Ahead> = None;
    let mut next_id = 0;
    for _ in 0..400 {
        // Mostly quiet decode steps; now and then a new request, an abort or a finish.
        if rng.chance(0.08) || !s.has_unfinished() {
            let len = rng.range(1, (cfg.max_model_len as u64 / 2).max(2)) as usize;
            let prompt = (0..len)
                .map(|_| rng.below(common::VOCAB as u64) as i64)
                .collect();
            let p = RequestParams {
                request_id: format!("r{next_id}"),
                prompt_token_ids: prompt,
                max_tokens: rng.range(1, 48) as usize,
                eos_token_id: rng.chance(0.3).then_some(5),
                ..Default::default()
            };
            next_id += 1;
            let _ = sim.add(&mut s, p); // too large or at capacity: skipped
        }
        if rng.chance(0.03) && next_id > 0 {
            let id = format!("r{}", rng.below(next_id));
            if rng.chance(0.5) {
                s.abort(&id);
            } else {
                s.finish(&id, "stop");
            }
        }
        let plan = s.schedule().expect("schedule");
        if plan.num_seqs == 0 {
            continue; // no forward runs: a step launched ahead stays where it is
        }
        let table = s.block_table().to_vec();
        let old = ahead
            .as_ref()
            .is_some_and(|a| old_comparison(a, &plan, &table));
        let want = if old {
            ahead.as_ref().map(|a| a.id)
        } else {
            None
        };
        assert_eq!(
            plan.continues_plan_id, want,
            "seed {seed} steady {steady_path}: plan {} (old comparison {old})",
            plan.id
        );
        let in_place = old_may_run_ahead(&plan, &cfg);
        assert_eq!(
            plan.advances_in_place, in_place,
            "seed {seed} steady {steady_path}: plan {}",
            plan.id
        );
        if decode_only(&plan) {
            if in_place {
                counts.in_place += 1;
            } else {
                counts.not_in_place += 1;
            }
        }
        if ahead.is_some() && decode_only(&plan) {
            if old {
                counts.matched += 1;
            } else {
                counts.unmatched += 1;
            }
        }
        let sampled = sim.execute(&s, &plan);
        ahead = decode_only(&plan).then(|| Ahead {
            id: plan.id,
            input_ids: sampled.clone(),
            positions: plan.positions.clone(),
            slot_mapping: plan.slot_mapping.clone(),
            num_seqs: plan.num_seqs,
            max_blocks: plan.max_blocks,
            block_table: table,
        });
        sim.commit(&mut s, &plan, &sampled);
        s.check_invariants().expect("invariants");
    }
}

#[test]
fn continues_plan_id_and_advances_in_place_match_the_run_ahead_rules() {
    let mut c = Counts::default();
    for seed in 0..300 {
        for steady_path in [true, false] {
            run(seed, steady_path, &mut c);
        }
    }
    // Both outcomes occur often, so neither side of either equivalence is vacuous.
    assert!(
        c.matched > 1000 && c.unmatched > 1000,
        "{} matched, {} not",
        c.matched,
        c.unmatched
    );
    assert!(
        c.in_place > 1000 && c.not_in_place > 1000,
        "{} in place, {} not",
        c.in_place,
        c.not_in_place
    );
}
