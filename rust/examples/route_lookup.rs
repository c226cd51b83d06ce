//! Cost of one routing lookup in the prefix index: hash a 4k-token prompt with the core's
//! block-hash chain, then find every replica's longest cached prefix, over 64 replicas
//! and about a million indexed blocks. Prints minimum and median microseconds of hashing
//! and of the lookup.
//!
//! Run: cargo run --release --example route_lookup -- [replicas] [indexed_blocks] [prompt_tokens]

use std::time::Instant;

use kvserve_core::prefix_cache::block_hashes;
use kvserve_core::prefix_index::PrefixIndex;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let replicas: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let blocks: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1 << 20);
    let prompt_len: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4096);
    let bs = 16;
    let mut ix = PrefixIndex::new(blocks);
    let names: Vec<String> = (0..replicas).map(|i| format!("replica-{i}")).collect();
    for n in &names {
        ix.add_replica(n)?;
    }
    // Each replica caches its own conversations (4k-token chains), and every replica
    // also holds the first half of the prompt under test: the lookup walks deep.
    let prompt: Vec<i64> = (0..prompt_len as i64).map(|t| t * 7 % 50_000).collect();
    let chain = block_hashes(&prompt, bs, None);
    let per_replica = blocks / replicas;
    let mut seed = 1i64;
    for (i, n) in names.iter().enumerate() {
        let mut held = 0;
        ix.store(n, &chain[..chain.len() / 2 + i % 8])?;
        while held < per_replica {
            let conv: Vec<i64> = (0..4096).map(|k| (seed * 31 + k) % 50_000).collect();
            seed += 1;
            let hs = block_hashes(&conv, bs, None);
            held += ix.store(n, &hs)?;
        }
    }
    println!(
        "indexed {} distinct blocks over {replicas} replicas",
        ix.len()
    );
    let (mut hash_us, mut lookup_us) = (Vec::new(), Vec::new());
    let mut depth_sum = 0;
    for _ in 0..2000 {
        let t0 = Instant::now();
        let hs = block_hashes(&prompt, bs, None);
        let t1 = Instant::now();
        let got = ix.longest_prefixes(&hs);
        let t2 = Instant::now();
        depth_sum += got.iter().map(|(_, d)| d).sum::<usize>();
        hash_us.push((t1 - t0).as_secs_f64() * 1e6);
        lookup_us.push((t2 - t1).as_secs_f64() * 1e6);
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "hash {prompt_len} tokens: min {:.1} us, median {:.1} us",
        min(&hash_us),
        median(&mut hash_us)
    );
    println!(
        "lookup over {replicas} replicas: min {:.1} us, median {:.1} us (depth sum {depth_sum})",
        min(&lookup_us),
        median(&mut lookup_us)
    );
    Ok(())
}
