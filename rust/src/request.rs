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

/// Field order matters: `repr(C)` with 64-byte alignment keeps the fields every step
/// touches (schedule, plan, commit) in the first two cache lines; the rest follows.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub struct Request {
    pub handle: u64,
    /// Leading tokens whose K/V are in this request's blocks.
    pub num_computed: usize,
    /// Prompt followed by every output token so far.
    pub tokens: Vec<i64>,
    /// GPU blocks, in order; covers at least `num_computed` tokens while running.
    pub blocks: Vec<u32>,
    /// `tokens`' last element, kept inline for the decode hot path.
    pub last_token: i64,
    /// Leading blocks already registered in (or taken from) the prefix cache.
    pub num_registered_blocks: usize,
    pub num_prompt_tokens: usize,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub eos_token_id: Option<i64>,
    pub status: Status,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<i64>,
    // ---- cold: admission, preemption, stats
    pub id: String,
    pub priority: i64,
    pub arrival: u64,
    pub root_hash: u128,
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
    pub fn new(p: RequestParams, handle: u64, arrival: u64, root_hash: u128) -> Self {
        let num_prompt_tokens = p.prompt_token_ids.len();
        let last_token = p.prompt_token_ids.last().copied().unwrap_or(0);
        Request {
            id: p.request_id,
            handle,
            tokens: p.prompt_token_ids,
            last_token,
            num_prompt_tokens,
            max_tokens: p.max_tokens,
            min_tokens: p.min_tokens,
            stop_token_ids: p.stop_token_ids,
            eos_token_id: p.eos_token_id,
            ignore_eos: p.ignore_eos,
            priority: p.priority,
            arrival,
            root_hash,
            status: Status::Waiting,
            num_computed: 0,
            blocks: Vec::new(),
            host_blocks: Vec::new(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            cached_prompt_tokens: 0,
            computed_before_preemption: 0,
            admitted_once: false,
            num_preemptions: 0,
        }
    }

    pub fn num_output_tokens(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }

    /// Tokens still to run through the model before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Order key for queues and preemption: lower priority value first, then arrival.
    pub fn order_key(&self) -> (i64, u64) {
        (self.priority, self.arrival)
    }

    /// The finish reason once `token` has been appended, if any.
    pub fn stop_reason(&self, token: i64, max_model_len: usize) -> Option<&'static str> {
        let n_out = self.num_output_tokens();
        if n_out >= self.min_tokens {
            let is_eos = !self.ignore_eos && self.eos_token_id == Some(token);
            if is_eos || self.stop_token_ids.contains(&token) {
                return Some("stop");
            }
        }
        if n_out >= self.max_tokens || self.tokens.len() >= max_model_len {
            return Some("length");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(min: usize, max: usize, ignore_eos: bool) -> Request {
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
        Request::new(p, 0, 0, 0)
    }

    #[test]
    fn stop_conditions() {
        let mut r = req(2, 4, false);
        r.tokens.push(9);
        assert_eq!(r.stop_reason(9, 100), None, "min_tokens suppresses eos");
        r.tokens.push(7);
        assert_eq!(r.stop_reason(7, 100), Some("stop"));
        let mut r = req(0, 4, true);
        r.tokens.push(9);
        assert_eq!(r.stop_reason(9, 100), None, "ignore_eos");
        r.tokens.push(7);
        assert_eq!(r.stop_reason(7, 100), Some("stop"), "stop ids still apply");
        let mut r = req(0, 2, false);
        r.tokens.extend([1, 1]);
        assert_eq!(r.stop_reason(1, 100), Some("length"));
        let mut r = req(0, 10, false);
        r.tokens.push(1);
        assert_eq!(r.stop_reason(1, 4), Some("length"), "max_model_len");
    }
}
