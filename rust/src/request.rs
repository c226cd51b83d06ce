//! One request: its tokens (prompt then output), limits, state and blocks.

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Running,
    Swapped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Running => "running",
            Status::Swapped => "swapped",
        }
    }
}

/// What a caller gives to `add_request`.
#[derive(Debug, Clone, Default)]
pub struct RequestParams {
    pub request_id: String,
    pub prompt_token_ids: Vec<i64>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub stop_token_ids: Vec<i64>,
    pub eos_token_id: Option<i64>,
    pub ignore_eos: bool,
    pub priority: i64,
    pub cache_salt: Option<String>,
}

/// Fields every step touches, exactly two cache lines (`repr(C, align(64))`, checked by a
/// test): the schedule loop and `commit` visit every running request's record, so what
/// they read and write is packed here and the rest sits behind one pointer (`cold`).
/// Stop conditions are pre-folded into lengths and one token id for the same reason.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Request {
    // ---- line 0
    pub handle: u64,
    /// Leading tokens whose K/V are in this request's blocks.
    pub num_computed: usize,
    /// Output tokens not yet moved into `tokens`.
    pub num_recent: usize,
    /// The newest token (`tokens`' last element, or the newest recent one), kept inline
    /// for the decode hot path.
    pub last_token: i64,
    /// Prompt followed by every output token so far, except the latest `num_recent`,
    /// which wait in the scheduler's dense recent-token buffer (see `RecentTokens`).
    pub tokens: Vec<i64>,
    pub status: Status,
    /// `cold.stop_token_ids` is not empty.
    pub has_stop_ids: bool,
    /// Bumped whenever `blocks` is cleared, so a block-table row written from an older
    /// block list is never reused (see batch_table.rs).
    pub blocks_gen: u32,
    // ---- line 1
    /// GPU blocks, in order; covers at least `num_computed` tokens while running.
    pub blocks: Vec<u32>,
    /// Leading blocks already registered in (or taken from) the prefix cache.
    pub num_registered_blocks: usize,
    /// Finish with "length" once this many tokens exist: min(prompt + max_tokens,
    /// max_model_len).
    pub length_limit: usize,
    /// Stop tokens count only once this many tokens exist (prompt + min_tokens).
    pub min_len: usize,
    /// The eos id that stops this request, or -1 (none, or ignore_eos); sampled ids are
    /// never negative.
    pub stop_eos: i64,
    pub cold: Box<Cold>,
}

/// What only admission, preemption and stats read.
#[derive(Debug, Clone)]
pub struct Cold {
    pub id: String,
    pub priority: i64,
    pub arrival: u64,
    pub root_hash: u128,
    pub num_prompt_tokens: usize,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub eos_token_id: Option<i64>,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<i64>,
    /// Host blocks while swapped out.
    pub host_blocks: Vec<u32>,
    /// Digests of the leading full blocks of `tokens` (computed lazily).
    pub block_hashes: Vec<u128>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: usize,
    /// Tokens computed before a recompute preemption (to count recomputation).
    pub computed_before_preemption: usize,
    pub admitted_once: bool,
    pub num_preemptions: u32,
}

impl Request {
    pub fn new(
        p: RequestParams,
        handle: u64,
        arrival: u64,
        root_hash: u128,
        max_model_len: usize,
    ) -> Self {
        let num_prompt_tokens = p.prompt_token_ids.len();
        let last_token = p.prompt_token_ids.last().copied().unwrap_or(0);
        let stop_eos = match p.eos_token_id {
            Some(e) if !p.ignore_eos && e >= 0 => e,
            _ => -1,
        };
        Request {
            handle,
            num_computed: 0,
            num_recent: 0,
            last_token,
            tokens: p.prompt_token_ids,
            status: Status::Waiting,
            has_stop_ids: !p.stop_token_ids.is_empty(),
            blocks_gen: 0,
            blocks: Vec::new(),
            num_registered_blocks: 0,
            length_limit: num_prompt_tokens
                .saturating_add(p.max_tokens)
                .min(max_model_len),
            min_len: num_prompt_tokens.saturating_add(p.min_tokens),
            stop_eos,
            cold: Box::new(Cold {
                id: p.request_id,
                priority: p.priority,
                arrival,
                root_hash,
                num_prompt_tokens,
                max_tokens: p.max_tokens,
                min_tokens: p.min_tokens,
                eos_token_id: p.eos_token_id,
                ignore_eos: p.ignore_eos,
                stop_token_ids: p.stop_token_ids,
                host_blocks: Vec::new(),
                block_hashes: Vec::new(),
                cached_prompt_tokens: 0,
                computed_before_preemption: 0,
                admitted_once: false,
                num_preemptions: 0,
            }),
        }
    }

    /// Prompt plus output tokens (including those still in the recent buffer).
    #[inline]
    pub fn num_tokens(&self) -> usize {
        self.tokens.len() + self.num_recent
    }

    pub fn num_output_tokens(&self) -> usize {
        self.num_tokens() - self.cold.num_prompt_tokens
    }

    /// Tokens still to run through the model before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.num_tokens() - self.num_computed
    }

    /// Order key for queues and preemption: lower priority value first, then arrival.
    pub fn order_key(&self) -> (i64, u64) {
        (self.cold.priority, self.cold.arrival)
    }

    /// The finish reason once `token` has been appended, if any: stop (eos unless
    /// ignore_eos, or a stop id) once min_tokens are out, else length (max_tokens out or
    /// max_model_len reached).
    #[inline]
    pub fn stop_reason(&self, token: i64) -> Option<&'static str> {
        let n = self.num_tokens();
        if n >= self.min_len
            && (token == self.stop_eos
                || (self.has_stop_ids && self.cold.stop_token_ids.contains(&token)))
        {
            return Some("stop");
        }
        if n >= self.length_limit {
            return Some("length");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(min: usize, max: usize, ignore_eos: bool, max_model_len: usize) -> Request {
        let p = RequestParams {
            request_id: "r".into(),
            prompt_token_ids: vec![1, 2, 3],
            max_tokens: max,
            min_tokens: min,
            stop_token_ids: vec![7],
            eos_token_id: Some(9),
            ignore_eos,
            ..Default::default()
        };
        Request::new(p, 0, 0, 0, max_model_len)
    }

    #[test]
    fn hot_fields_fill_exactly_two_cache_lines() {
        assert_eq!(std::mem::size_of::<Request>(), 128);
        assert_eq!(std::mem::size_of::<Option<Request>>(), 128);
    }

    #[test]
    fn stop_conditions() {
        let mut r = req(2, 4, false, 100);
        r.tokens.push(9);
        assert_eq!(r.stop_reason(9), None, "min_tokens suppresses eos");
        r.tokens.push(7);
        assert_eq!(r.stop_reason(7), Some("stop"));
        let mut r = req(0, 4, true, 100);
        r.tokens.push(9);
        assert_eq!(r.stop_reason(9), None, "ignore_eos");
        r.tokens.push(7);
        assert_eq!(r.stop_reason(7), Some("stop"), "stop ids still apply");
        let mut r = req(0, 2, false, 100);
        r.tokens.extend([1, 1]);
        assert_eq!(r.stop_reason(1), Some("length"));
        let mut r = req(0, 10, false, 4);
        r.tokens.push(1);
        assert_eq!(r.stop_reason(1), Some("length"), "max_model_len");
        // Tokens still in the recent buffer count too.
        let mut r = req(0, 2, false, 100);
        r.num_recent = 2;
        assert_eq!(r.stop_reason(1), Some("length"));
    }
}
