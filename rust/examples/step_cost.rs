//! Pure-Rust cost of one engine step (schedule + commit) with N running decodes, ~1k-token
//! contexts sharing a 512-token prefix: the Rust half of benches/bench_core.py, without
//! Python, for profiling (`perf record ./target/release/examples/step_cost 4096`).
//!
//! Prints the minimum and median of the whole step, of `schedule` (including the plan's
//! block table synced into one of two recycled buffers, as the Python binding does) and
//! of `commit`. On a shared box compare builds
//! by interleaving their runs and looking at minimums. `STEADY=0` turns the steady-batch
//! shortcut off (the full path every step); `STEP_DUMP=1` also prints every step's
//! schedule / commit / total microseconds.
//!
//! Run: cargo run --release --example step_cost -- [num_seqs] [steps]

use std::time::Instant;

use kvserve_core::{Config, RequestParams, Scheduler};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let steps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let max_model_len = 1024 + 4 * steps;
    let cfg = Config {
        num_gpu_blocks: n * (max_model_len / 16 + 1) + 64,
        block_size: 16,
        max_num_seqs: n,
        max_num_batched_tokens: 16384.max(n),
        max_model_len,
        max_waiting: n,
        ..Config::default()
    };
    let mut s = Scheduler::new(cfg)?;
    s.set_steady_path(std::env::var("STEADY").map_or(true, |v| v != "0"));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 32000) as i64
    };
    let shared: Vec<i64> = (0..512).map(|_| rnd()).collect();
    for i in 0..n {
        let mut prompt = shared.clone();
        prompt.extend((0..512).map(|_| rnd()));
        s.add_request(RequestParams {
            request_id: format!("r{i}"),
            prompt_token_ids: prompt,
            max_tokens: 1 << 30,
            ignore_eos: true,
            ..Default::default()
        })?;
    }
    // Prefill everything, then time decode steps only.
    loop {
        let plan = s.schedule()?;
        let tokens: Vec<i64> = (0..plan.sample_handles.len()).map(|_| rnd()).collect();
        s.commit(plan.id, &tokens)?;
        if plan.num_decodes == n {
            break;
        }
    }
    let tokens: Vec<i64> = (0..n).map(|_| rnd()).collect();
    let (mut sched, mut commit, mut total) = (Vec::new(), Vec::new(), Vec::new());
    // The binding's recycled plan tables (one held by the last plan, one being filled).
    let mut tables: [(Vec<i32>, Option<u64>); 2] = [(Vec::new(), None), (Vec::new(), None)];
    for step in 0..steps {
        let t0 = Instant::now();
        let plan = s.schedule()?;
        let want = plan.num_seqs * plan.max_blocks;
        let (buf, stamp) = &mut tables[step % 2];
        if buf.len() < want {
            *buf = vec![0; want + want / 4];
            *stamp = None;
        }
        *stamp = Some(s.sync_block_table(&mut buf[..want], *stamp)?);
        let t1 = Instant::now();
        let out = s.commit(plan.id, &tokens)?;
        // The plan and output go back for reuse inside the timed step, as the binding does.
        s.recycle_output(out);
        let t2 = Instant::now();
        s.recycle_plan(plan);
        let t3 = Instant::now();
        sched.push((t1 - t0).as_secs_f64() * 1e6);
        commit.push((t2 - t1).as_secs_f64() * 1e6);
        total.push((t3 - t0).as_secs_f64() * 1e6);
    }
    if std::env::var("STEP_DUMP").is_ok() {
        for (i, ((a, b), t)) in sched.iter().zip(&commit).zip(&total).enumerate() {
            println!("{i} {a:.1} {b:.1} {t:.1}");
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mut sorted = total.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    println!(
        "{n} decodes: step p10 {:.1} / p90 {:.1} / max {:.1} us",
        pct(0.1),
        pct(0.9),
        pct(1.0)
    );
    println!(
        "{n} decodes ({steps} steps): step min {:.1} / median {:.1} us; \
         schedule min {:.1} / median {:.1} us; commit min {:.1} / median {:.1} us",
        min(&total),
        median(&mut total.clone()),
        min(&sched),
        median(&mut sched.clone()),
        min(&commit),
        median(&mut commit.clone()),
    );
    Ok(())
}
