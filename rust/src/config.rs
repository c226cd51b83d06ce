//! The core's configuration and its validation.

use crate::error::{config, CoreResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptionMode {
    Recompute,
    Swap,
    Auto,
}

impl PreemptionMode {
    pub fn parse(s: &str) -> CoreResult<Self> {
        match s {
            "recompute" => Ok(PreemptionMode::Recompute),
            "swap" => Ok(PreemptionMode::Swap),
            "auto" => Ok(PreemptionMode::Auto),
            _ => Err(config(
                "preemption_mode",
                format!("{s:?} is not one of \"recompute\", \"swap\", \"auto\""),
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub num_gpu_blocks: usize,
    pub block_size: usize,
    pub num_host_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub max_waiting: usize,
    pub enable_prefix_caching: bool,
    pub preemption_mode: PreemptionMode,
    /// Fraction of GPU blocks new admissions must leave available for running decodes.
    pub watermark: f64,
    /// K+V bytes per token over all layers (auto preemption's swap cost).
    pub kv_bytes_per_token: u64,
    /// Prefill FLOPs per token (auto preemption's recompute cost).
    pub flops_per_token: f64,
    pub swap_bytes_per_s: f64,
    pub prefill_flops_per_s: f64,
    /// How many ended requests `request_stats` still answers for.
    pub finished_memory: usize,
    /// How many evicted block digests are remembered (to count recomputed tokens); None:
    /// four per GPU block, at most 2**20.
    pub evicted_memory: Option<usize>,
    /// Host memory as a second prefix-cache tier: GPU prefix blocks going idle are copied
    /// to host blocks and loaded back on a hit (needs `num_host_blocks > 0` and prefix
    /// caching).
    pub host_prefix_cache: bool,
    /// Host -> GPU bandwidth, for the host tier's load-or-recompute choice.
    pub load_bytes_per_s: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_gpu_blocks: 1024,
            block_size: 16,
            num_host_blocks: 0,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: 4096,
            max_waiting: 4096,
            enable_prefix_caching: true,
            preemption_mode: PreemptionMode::Auto,
            watermark: 0.01,
            kv_bytes_per_token: 0,
            flops_per_token: 0.0,
            swap_bytes_per_s: 25e9,
            prefill_flops_per_s: 1e14,
            finished_memory: 4096,
            evicted_memory: None,
            host_prefix_cache: false,
            load_bytes_per_s: 25e9,
        }
    }
}

impl Config {
    pub fn validate(&self) -> CoreResult<()> {
        // Block ids travel as i32 in the plan's block table.
        const MAX_BLOCKS: usize = i32::MAX as usize;
        if self.num_gpu_blocks == 0 {
            return Err(config("num_gpu_blocks", "must be at least 1"));
        }
        if self.num_gpu_blocks > MAX_BLOCKS || self.num_host_blocks > MAX_BLOCKS {
            return Err(config(
                "num_gpu_blocks",
                format!("must be at most {MAX_BLOCKS}"),
            ));
        }
        if !self.block_size.is_power_of_two() || self.block_size > 256 {
            return Err(config(
                "block_size",
                format!("{} is not a power of two in 1..=256", self.block_size),
            ));
        }
        if self.max_num_seqs == 0 {
            return Err(config("max_num_seqs", "must be at least 1"));
        }
        if self.max_num_batched_tokens == 0 {
            return Err(config("max_num_batched_tokens", "must be at least 1"));
        }
        if self.max_model_len < 2 || self.max_model_len > i32::MAX as usize {
            return Err(config("max_model_len", "must be in 2..=2**31-1"));
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return Err(config(
                "watermark",
                format!("{} is not in [0, 1)", self.watermark),
            ));
        }
        if !(self.flops_per_token >= 0.0 && self.flops_per_token.is_finite()) {
            return Err(config("flops_per_token", "must be a finite number >= 0"));
        }
        if !(self.swap_bytes_per_s > 0.0 && self.swap_bytes_per_s.is_finite()) {
            return Err(config("swap_bytes_per_s", "must be a finite number > 0"));
        }
        if !(self.prefill_flops_per_s > 0.0 && self.prefill_flops_per_s.is_finite()) {
            return Err(config("prefill_flops_per_s", "must be a finite number > 0"));
        }
        if !(self.load_bytes_per_s > 0.0 && self.load_bytes_per_s.is_finite()) {
            return Err(config("load_bytes_per_s", "must be a finite number > 0"));
        }
        if self.host_prefix_cache && self.num_host_blocks == 0 {
            return Err(config(
                "host_prefix_cache",
                "needs host blocks (num_host_blocks > 0)",
            ));
        }
        if self.host_prefix_cache && !self.enable_prefix_caching {
            return Err(config(
                "host_prefix_cache",
                "needs enable_prefix_caching (it is the prefix cache's second tier)",
            ));
        }
        if self.preemption_mode == PreemptionMode::Swap && self.num_host_blocks == 0 {
            return Err(config(
                "num_host_blocks",
                "preemption_mode \"swap\" needs host blocks",
            ));
        }
        Ok(())
    }

    pub fn watermark_blocks(&self) -> usize {
        (self.watermark * self.num_gpu_blocks as f64) as usize
    }

    /// Blocks a sequence holding `num_tokens` K/V entries needs.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        // block_size is a power of two: shifts keep divisions off the per-sequence path.
        (num_tokens + self.block_size - 1) >> self.block_shift()
    }

    /// The evicted-digest record's bound (see `evicted_memory`).
    pub fn evicted_capacity(&self) -> usize {
        self.evicted_memory
            .unwrap_or_else(|| self.num_gpu_blocks.saturating_mul(4).min(1 << 20))
    }

    pub fn block_shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let bad = |f: fn(&mut Config), field: &str| {
            let mut c = Config::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        };
        bad(|c| c.block_size = 24, "block_size");
        bad(|c| c.block_size = 512, "block_size");
        bad(|c| c.block_size = 0, "block_size");
        bad(|c| c.num_gpu_blocks = 0, "num_gpu_blocks");
        bad(|c| c.max_num_batched_tokens = 0, "max_num_batched_tokens");
        bad(|c| c.max_num_seqs = 0, "max_num_seqs");
        bad(|c| c.watermark = 1.5, "watermark");
        bad(
            |c| c.preemption_mode = PreemptionMode::Swap,
            "num_host_blocks",
        );
        bad(|c| c.host_prefix_cache = true, "host_prefix_cache");
        bad(
            |c| {
                c.host_prefix_cache = true;
                c.num_host_blocks = 4;
                c.enable_prefix_caching = false;
            },
            "host_prefix_cache",
        );
        bad(|c| c.load_bytes_per_s = 0.0, "load_bytes_per_s");
        for bs in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            let c = Config {
                block_size: bs,
                ..Config::default()
            };
            c.validate().unwrap();
        }
    }
}
