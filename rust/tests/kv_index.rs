//! The router's prefix index against a plain model, and the core's KV events against
//! the core's own prefix cache: replaying every drained batch (and a snapshot after each
//! overflow) rebuilds exactly what the cache holds, and an index fed by those events
//! answers every longest-prefix query as the model of the cache does.

mod common;

use std::collections::{HashMap, HashSet};

use common::Rng;
use kvserve_core::kv_events::KvEventKind;
use kvserve_core::prefix_cache::block_hashes;
use kvserve_core::prefix_index::{PrefixIndex, Tier};
use kvserve_core::{Config, PreemptionMode, RequestParams, Scheduler};
use proptest::prelude::*;

fn model_depth(held: &HashSet<u128>, chain: &[u128]) -> usize {
    chain.iter().take_while(|h| held.contains(h)).count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn index_matches_model(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let cap = rng.range(1, 40) as usize;
        let mut ix = PrefixIndex::new(cap);
        let mut model: HashMap<String, HashSet<u128>> = HashMap::new();
        let names: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
        for _ in 0..300 {
            let name = &names[rng.below(6) as usize];
            let hashes: Vec<u128> = (0..rng.range(0, 8)).map(|_| rng.below(30) as u128).collect();
            match rng.below(6) {
                0 => {
                    ix.add_replica(name).unwrap();
                    model.entry(name.clone()).or_default();
                }
                1 | 2 => {
                    let r = ix.store(name, &hashes);
                    match model.get_mut(name) {
                        None => prop_assert!(r.is_err()),
                        Some(set) => {
                            for h in &hashes {
                                if set.len() < cap { set.insert(*h); }
                            }
                        }
                    }
                }
                3 => {
                    let r = ix.evict(name, &hashes);
                    match model.get_mut(name) {
                        None => prop_assert!(r.is_err()),
                        Some(set) => for h in &hashes { set.remove(h); },
                    }
                }
                4 => {
                    if rng.chance(0.5) {
                        prop_assert_eq!(ix.remove_replica(name), model.remove(name).is_some());
                    } else if let Some(set) = model.get_mut(name) {
                        ix.clear_replica(name).unwrap();
                        set.clear();
                    }
                }
                _ => {
                    let chain: Vec<u128> = (0..rng.range(0, 10)).map(|_| rng.below(30) as u128).collect();
                    let got: HashMap<String, usize> = ix.longest_prefixes(&chain)
                        .into_iter().map(|(n, d)| (n.to_string(), d)).collect();
                    let want: HashMap<String, usize> = model.iter()
                        .map(|(n, s)| (n.clone(), model_depth(s, &chain))).collect();
                    prop_assert_eq!(got, want);
                }
            }
            let distinct: HashSet<u128> = model.values().flatten().copied().collect();
            prop_assert_eq!(ix.len(), distinct.len());
            for (n, s) in &model {
                prop_assert_eq!(ix.replica_stats(n).unwrap().0, s.len());
            }
        }
    }

    #[test]
    fn events_rebuild_the_cache(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let block_size = 1usize << rng.range(0, 3);
        let num_host_blocks = rng.range(0, 24) as usize;
        let cfg = Config {
            num_gpu_blocks: rng.range(8, 40) as usize,
            block_size,
            num_host_blocks,
            max_num_seqs: rng.range(1, 6) as usize,
            max_num_batched_tokens: rng.range(8, 64) as usize,
            max_model_len: 64,
            max_waiting: 16,
            enable_prefix_caching: true,
            preemption_mode: PreemptionMode::Recompute,
            watermark: 0.0,
            kv_bytes_per_token: 1,
            flops_per_token: 1e9,
            swap_bytes_per_s: 25e9,
            prefill_flops_per_s: 1e14,
            host_prefix_cache: num_host_blocks > 0,
            load_bytes_per_s: 25e9,
            ..Config::default()
        };
        let mut s = Scheduler::new(cfg).unwrap();
        // A tiny log overflows often: the resync path is exercised as well as the normal one.
        s.prefix_cache_mut().set_event_capacity(rng.range(1, 64) as usize);
        let bases: Vec<Vec<i64>> = (0..3).map(|_| (0..40).map(|_| rng.below(50) as i64).collect()).collect();
        let mut replay: HashSet<u128> = HashSet::new();
        let mut replay_host: HashSet<u128> = HashSet::new();
        let mut next_seq = 1u64;
        let mut ix = PrefixIndex::new(1 << 20);
        ix.add_replica("r").unwrap();
        let mut prompts: Vec<(Vec<i64>, Option<String>)> = Vec::new();
        for step in 0..200 {
            if rng.chance(0.3) {
                let base = &bases[rng.below(3) as usize];
                let keep = rng.range(1, 40) as usize;
                let mut p: Vec<i64> = base[..keep].to_vec();
                p.extend((0..rng.range(0, 8)).map(|_| rng.below(50) as i64));
                let salt = rng.chance(0.2).then(|| "t".to_string());
                let _ = s.add_request(RequestParams {
                    request_id: format!("q{step}"),
                    prompt_token_ids: p.clone(),
                    max_tokens: rng.range(1, 10) as usize,
                    min_tokens: 0,
                    stop_token_ids: vec![],
                    eos_token_id: None,
                    ignore_eos: true,
                    priority: 0,
                    cache_salt: salt.clone(),
                });
                prompts.push((p, salt));
            }
            let plan = s.schedule().unwrap();
            if plan.must_commit() {
                let toks: Vec<i64> = plan.sample_handles.iter().map(|_| rng.below(50) as i64).collect();
                s.commit(plan.id, &toks).unwrap();
            }
            if rng.chance(0.05) {
                let _ = s.abort(&format!("q{}", rng.below(step as u64 + 1)));
            }
            // A snapshot may be taken before a drain: the drain then repeats events the
            // snapshot covers, and the reader skips them by sequence number.
            let early = rng.chance(0.1).then(|| s.kv_snapshot());
            let b = s.prefix_cache_mut().drain_events();
            let snap = if b.resync_needed { Some(s.kv_snapshot()) } else { early };
            if let Some((seq, snap, snap_host)) = snap {
                replay = snap.iter().copied().collect();
                replay_host = snap_host.iter().copied().collect();
                ix.clear_replica("r").unwrap();
                ix.store("r", &snap).unwrap();
                ix.store_in(Tier::Host, "r", &snap_host).unwrap();
                next_seq = seq + 1;
            }
            if !b.resync_needed {
                prop_assert!(b.kinds.is_empty() || b.first_seq <= next_seq);
                let skip = (next_seq - b.first_seq.min(next_seq)) as usize;
                next_seq = next_seq.max(b.first_seq + b.kinds.len() as u64);
                for (k, h) in b.kinds.iter().zip(&b.hashes).skip(skip) {
                    match k {
                        KvEventKind::Stored => {
                            prop_assert!(replay.insert(*h));
                            ix.store("r", &[*h]).unwrap();
                        }
                        KvEventKind::Evicted => {
                            prop_assert!(replay.remove(h));
                            ix.evict("r", &[*h]).unwrap();
                        }
                        KvEventKind::HostStored => {
                            prop_assert!(replay_host.insert(*h));
                            ix.store_in(Tier::Host, "r", &[*h]).unwrap();
                        }
                        KvEventKind::HostEvicted => {
                            prop_assert!(replay_host.remove(h));
                            ix.evict_from(Tier::Host, "r", &[*h]).unwrap();
                        }
                    }
                }
            }
            let truth: HashSet<u128> = s.prefix_cache_mut().iter().map(|(h, _)| h).collect();
            prop_assert_eq!(&replay, &truth);
            let (_, _, host) = s.kv_snapshot();
            let truth_host: HashSet<u128> = host.into_iter().collect();
            prop_assert_eq!(&replay_host, &truth_host);
            prop_assert_eq!(truth_host.len(), s.num_host_cached_blocks());
            if let Some((p, salt)) = prompts.last() {
                let chain = block_hashes(p, block_size, salt.as_deref());
                prop_assert_eq!(ix.longest_prefixes(&chain), vec![("r", model_depth(&truth, &chain))]);
                let either: HashSet<u128> = truth.union(&truth_host).copied().collect();
                prop_assert_eq!(
                    ix.longest_prefixes_by_tier(&chain),
                    vec![("r", model_depth(&truth, &chain), model_depth(&either, &chain))]
                );
            }

        }
    }
}
