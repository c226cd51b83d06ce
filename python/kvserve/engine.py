"""The synchronous engine: the step loop schedule -> forward -> sample -> commit -> deltas."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvserve.attention import get_backend
from kvserve.attention.kv_quant import check_kv_cache_dtype, kv_dtype_name
from kvserve.detokenizer import IncrementalDetokenizer
from kvserve.engine_args import EngineArgs
from kvserve.errors import InvalidRequestError
from kvserve.host_tier import resolve_host_tier
from kvserve.model import load_checkpoint
from kvserve.outputs import RequestOutput, StepStats
from kvserve.request_state import RequestState
from kvserve.runner import ModelRunner
from kvserve.sampling import Sampler
from kvserve.sampling_params import SamplingParams
from kvserve.step_cost import ModelCost, attention_pairs
from kvserve.stop_strings import StopStringMatcher

if TYPE_CHECKING:  # xgrammar loads at the first structured request
    from xgrammar import GrammarMatcher

    from kvserve._core import Core, Plan, StepOutput
    from kvserve.grammar import GrammarCompiler
    from kvserve.model.config import ModelConfig

log = logging.getLogger(__name__)
StepListener = Callable[[StepStats], None]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from kvserve import _core

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(args.dtype, self.device)
        if args.model is None:
            from kvserve.default_model import default_model_path

            model_path = str(default_model_path())
        else:
            model_path = args.model
        ckpt = load_checkpoint(model_path)
        cfg = ckpt.config
        self.model_name = cfg.name
        self.tokenizer = ckpt.tokenizer
        _ = self.tokenizer.bound  # computed once here, not on a first request
        limit = min(cfg.max_position_embeddings, cfg.sliding_window or 1 << 62)
        self.max_model_len = min(args.max_model_len or limit, limit)
        if args.executor == "sim":  # the step-time model instead of the forward pass
            from kvserve.sim.executor import SimRunner

            self.runner: ModelRunner | SimRunner = SimRunner(cfg, args, cfg.vocab_size)
        else:
            backend = get_backend(args.attention_backend, self.device)
            kv_dtype = check_kv_cache_dtype(backend, args.kv_cache_dtype, self.dtype,
                                            cfg.head_dim)
            self._resolve_token_budget(cfg, kv_dtype)
            self.runner = ModelRunner(ckpt, backend, self.device, self.dtype, args.block_size,
                                      self.max_model_len, int(args.max_num_batched_tokens),
                                      args.max_num_seqs, args.kv_cache_bytes,
                                      args.gpu_memory_utilization, args.swap_bytes,
                                      enforce_eager=args.enforce_eager, kv_dtype=kv_dtype,
                                      host_tier_bytes=resolve_host_tier(
                                          args.host_kv_cache_bytes, args.swap_bytes,
                                          args.enable_prefix_caching, self.device.type),
                                      num_gpu_blocks_override=args.num_gpu_blocks_override)
        self.core = _core.Core(
            num_gpu_blocks=self.runner.num_blocks, block_size=args.block_size,
            num_host_blocks=self.runner.num_host_blocks, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=int(args.max_num_batched_tokens),
            max_model_len=self.max_model_len, max_waiting=args.max_waiting,
            enable_prefix_caching=args.enable_prefix_caching,
            preemption_mode=args.preemption_mode,
            kv_bytes_per_token=self.runner.kv_bytes_per_token,
            flops_per_token=cfg.flops_per_token, **_host_tier_settings(self.runner))
        self.invalid_request_error: type[Exception] = InvalidRequestError
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(args.seed))
        self.vocab_size = cfg.vocab_size
        # Weight bytes a step reads: all but the embedding table, plus one row per token.
        weight_bytes = self.runner.model.weight_bytes_read(0)
        self.cost = ModelCost(
            weight_bytes=float(weight_bytes),
            embed_row_bytes=float(self.runner.model.weight_bytes_read(1) - weight_bytes),
            kv_bytes_per_token=float(self.runner.kv_bytes_per_token),
            flops_per_token=cfg.flops_per_token,
            attn_flops_per_pair=4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim)
        self._lock = threading.Lock()  # the core is not thread-safe; never held in forward
        # Live requests by the core's handle; the core owns request id -> handle.
        self._requests: dict[int, RequestState] = {}
        self._listeners: list[StepListener] = []
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        self._grammars_lock = threading.Lock()

    def _resolve_token_budget(self, cfg: ModelConfig, kv_dtype: torch.dtype) -> None:
        """--max-num-batched-tokens auto without a profile: the datasheet roofline of this
        device for this model (see EngineArgs.resolve_token_budget)."""
        if self.args.max_num_batched_tokens != "auto":
            return
        from kvserve.sim.budget import datasheet_profile

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        elem = torch.empty((), dtype=self.dtype).element_size()
        kv_elem = torch.empty((), dtype=kv_dtype).element_size()
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_elem
        prof = datasheet_profile(cfg, name, elem, kv_bytes, self.max_model_len)
        self.args.resolve_token_budget(prof, self.max_model_len, name)

    # ---- the step loop --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return a delta for every request that got a token or finished."""
        return list(self.step_by_handle().values())

    def step_by_handle(self) -> dict[int, RequestOutput]:
        """`step`, its deltas keyed by the core's handle of their request."""
        start = time.perf_counter()
        with self._lock:
            plan = self.core.schedule()
            rows = [self._requests[h] for h in plan.sample_handles.tolist()]
        if plan.num_seqs == 0 and not plan.must_commit:
            return self._run_copies_only(plan)
        try:
            logits = self.runner.execute(plan, greedy_only=Sampler.greedy_only(rows))
            # last_greedy: the argmax the decode graph computed, if a graph ran (else None).
            sampled = self.sampler(logits, rows, self.runner.last_greedy) \
                if rows and logits is not None else None
        except Exception as exc:  # a failed forward ends its requests, not the engine
            log.exception("engine step failed")
            return self._fail(plan, f"{type(exc).__name__}: {exc}")
        copies_done = self.runner.wait_copies()  # the commit tells the core they landed
        tokens = sampled.token_ids.numpy() if sampled else np.zeros(0, np.int64)
        logprobs = dict(zip(plan.sample_handles.tolist(), sampled.logprobs)) \
            if sampled and sampled.logprobs else {}
        with self._lock:
            failed = {} if copies_done else self._fail_copies(plan.id, "host copy timed out")
            out = self.core.commit(plan.id, tokens)
            deltas = failed | self._collect(out, logprobs)
        self._notify(plan, time.perf_counter() - start)
        return deltas

    def _collect(self, out: StepOutput, logprobs: dict[int, Any]) -> dict[int, RequestOutput]:
        deltas: dict[int, RequestOutput] = {}
        for handle, token in zip(out.handles.tolist(), out.token_ids.tolist()):
            state = self._requests.get(handle)
            if state is None:  # aborted while the forward ran
                continue
            deltas[handle], hit_stop = state.append(token, logprobs.get(handle))
            if hit_stop:
                # Ended here, not in the commit: the core reports its cached prompt tokens.
                cached = self.core.finish(state.request_id, "stop")
                if cached is not None:
                    self._end(state, deltas[handle], "stop", cached)
        for handle, reason, cached in zip(out.finished_handles.tolist(), out.finish_reasons,
                                          out.finished_cached_prompt_tokens.tolist()):
            state = self._requests.get(handle)
            if state is not None:
                self._end(state, deltas[handle], reason, cached)
        return deltas

    def _end(self, state: RequestState, delta: RequestOutput, reason: str,
             cached_prompt_tokens: int) -> None:
        state.finish(delta, reason, cached_prompt_tokens)
        del self._requests[state.handle]

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None,
                    messages: list[dict[str, Any]] | None = None,
                    cache_salt: str | None = None) -> RequestState:
        """Validate and queue; on any error nothing is queued and the engine is unchanged."""
        self.check_params(params)
        ids = self.encode_prompt(prompt, prompt_token_ids, messages)
        return self.add_encoded(request_id, ids, params, cache_salt, self.compile_grammar(params))

    def check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError("params: expected a SamplingParams")
        params.validate(self.vocab_size)

    def admitting(self) -> bool:
        """Whether the waiting queue has room, asked of the core without the engine lock: the
        count is one consistent read; it may be a moment old, which is all a pre-check needs
        (the core's add_request is the authority)."""
        return self._read_unlocked(lambda c: c.num_waiting) < self.args.max_waiting

    def num_unfinished(self) -> int:
        """Requests waiting, swapped or running, read like `admitting` (no lock)."""
        return self._read_unlocked(lambda c: c.num_waiting + c.num_swapped + c.num_running)

    def _read_unlocked(self, read: Callable[[Core], int]) -> int:
        """A core counter read without the engine lock. The binding refuses it (RuntimeError)
        while the step thread is inside a mutating core call that let the GIL go (building
        its result objects can run Python code); then it is read under the lock."""
        try:
            return int(read(self.core))
        except RuntimeError:
            with self._lock:
                return int(read(self.core))

    def at_capacity_error(self) -> Exception:
        from kvserve import _core

        waiting = self._read_unlocked(lambda c: c.num_waiting)
        return _core.AtCapacityError(
            f"at capacity: {waiting} requests waiting "
            f"(max_waiting={self.args.max_waiting}); retry later")

    def encode_prompt(self, prompt: str | None, ids: list[int] | None,
                      messages: list[dict[str, Any]] | None) -> list[int]:
        """The prompt's token ids (a text far over max_model_len is refused before it is
        tokenized; the core checks the ids' length). Takes no lock and touches no request
        state, so it may run on any thread (the AsyncEngine runs it off the loop)."""
        given = [x is not None for x in (prompt, ids, messages)]
        if sum(given) != 1:
            raise self.invalid_request_error(
                "prompt: give exactly one of prompt, prompt_token_ids or messages")
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages)
            # The template writes its own BOS/special tokens.
            ids = self._encode("messages", text, add_special_tokens=False)
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise self.invalid_request_error("prompt: must be a string")
            ids = self._encode("prompt", prompt, add_special_tokens=True) if prompt else []
        else:
            ids = [int(t) for t in ids]  # type: ignore[union-attr]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise self.invalid_request_error(
                    f"prompt_token_ids: token id {bad[0]} outside [0, {self.vocab_size})")
        if not ids:
            raise self.invalid_request_error("prompt: must not be empty")
        return ids

    def _encode(self, field_name: str, text: str, add_special_tokens: bool) -> list[int]:
        fewest = self.tokenizer.fewest_tokens(text)
        if fewest >= self.max_model_len:  # refused without tokenizing it
            raise self.invalid_request_error(
                f"{field_name}: {len(text.encode('utf-8'))} bytes is at least {fewest} tokens; "
                f"must be shorter than max_model_len ({self.max_model_len})")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def compile_grammar(self, params: SamplingParams) -> GrammarMatcher | None:
        """The structured-output matcher of a request (ValueError naming the field if its
        spec does not compile). Takes no engine lock, so it may run off the event loop."""
        return self.grammars.matcher(params.structured) if params.structured else None

    def add_encoded(self, request_id: str | None, ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None, grammar: GrammarMatcher | None = None,
                    on_added: Callable[[RequestState], None] | None = None) -> RequestState:
        """Queue a request whose prompt `encode_prompt` made, whose params `check_params`
        passed and whose grammar `compile_grammar` built. The core validates what it owns
        (max_model_len, min_tokens against max_tokens, a live duplicate id). `on_added` runs
        under the engine lock once it is queued, before any step can produce its output."""
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        stop_ids = list(dict.fromkeys([*(params.stop_token_ids or []), *eos[1:]]))
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            handle = self.core.add_request(
                request_id, np.asarray(ids, dtype=np.int64), max_tokens,
                min_tokens=params.min_tokens, stop_token_ids=stop_ids,
                eos_token_id=self.tokenizer.eos_token_id, ignore_eos=params.ignore_eos,
                cache_salt=cache_salt)
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed(params.seed)
            state = RequestState(
                request_id, handle, params, ids,
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                StopStringMatcher(params.stop_list), gen,
                min_tokens_blocked_ids=[*self.tokenizer.eos_token_ids,
                                        *(params.stop_token_ids or [])],
                grammar=grammar)
            self._requests[handle] = state
            if on_added is not None:
                on_added(state)
        return state

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured-output compiler and its cache, built on first use (it indexes the
        vocabulary, which takes a second on a large one)."""
        with self._grammars_lock:
            if self._grammars is None:
                from kvserve.grammar import GrammarCompiler

                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
            return self._grammars

    def abort(self, request_id: str) -> bool:
        """End a live request now; False when the id is not live."""
        return self.abort_request(request_id) is not None

    def abort_request(self, request_id: str) -> int | None:
        """`abort`, returning the core's handle of the request it ended (None: not live)."""
        with self._lock:
            handle = self.core.abort(request_id)
            if handle is not None:
                self._requests.pop(handle, None)
            return handle

    def close(self) -> None:
        """Abort what is left and free the device memory (model, KV cache, graphs)."""
        for state in list(self._requests.values()):
            self.abort(state.request_id)
        self.runner.close()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests) or bool(self.core.has_unfinished())

    def _fail_copies(self, plan_id: int, message: str) -> dict[int, RequestOutput]:
        """The core ends the requests whose host-tier loads did not land and forgets the
        host blocks offloads did not fill (nothing stale is served). Under the lock."""
        deltas: dict[int, RequestOutput] = {}
        for request_id in self.core.fail_copies(plan_id):
            handle = int(self.core.request_stats(request_id)["handle"])
            state = self._requests.pop(handle, None)
            if state is not None:
                deltas[handle] = _error_output(state, message)
        return deltas

    def _run_copies_only(self, plan: Plan) -> dict[int, RequestOutput]:
        """A plan with neither sequences nor host-tier copies may still carry swaps or block
        copies (a step that preempted its only row): they run; there is nothing to commit."""
        if not (len(plan.swap_out) or len(plan.swap_in) or len(plan.copies)):
            return {}
        try:
            self.runner.execute(plan)
        except Exception as exc:  # a failed copy ends what needed it, not the engine
            log.exception("engine copy step failed")
            return self._fail(plan, f"{type(exc).__name__}: {exc}")
        return {}

    def _fail(self, plan: Plan, message: str) -> dict[int, RequestOutput]:
        deltas: dict[int, RequestOutput] = {}
        with self._lock:
            # Host-tier copies of a failed step count as failed: what they wrote is never
            # served (the core ends the requests that needed its loads; they are rows here).
            self.core.fail_copies(plan.id)
            for h in plan.handles.tolist():
                state = self._requests.pop(h, None)
                if state is None:
                    continue
                self.core.abort(state.request_id)
                deltas[h] = _error_output(state, message)
            # Every row's request is gone now, so the commit only closes the plan.
            if plan.must_commit:
                self.core.commit(plan.id, np.zeros(len(plan.sample_handles), np.int64))
        return deltas

    # ---- load and step statistics ---------------------------------------------------------

    def add_step_listener(self, fn: StepListener) -> None:
        self._listeners.append(fn)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            m = dict(self.core.metrics())
            m["waiting_prompt_tokens"] = int(self.core.waiting_prompt_tokens())
        link = self.runner.link_bytes_per_s  # measured with the host tier
        if link:
            m["host_link_d2h_bytes_per_s"], m["host_link_h2d_bytes_per_s"] = link
        return m

    # ---- KV events (the prefix cache's stored/evicted block hashes, for routers) ----------

    def enable_kv_events(self, capacity: int) -> None:
        with self._lock:
            self.core.enable_kv_events(capacity)

    def drain_kv_events(self) -> tuple[bool, int, bytes, bytes]:
        with self._lock:
            return self.core.drain_kv_events()

    def kv_snapshot(self) -> tuple[int, bytes, bytes]:
        with self._lock:
            return self.core.kv_snapshot()

    @property
    def model_info(self) -> dict[str, Any]:
        """What ModelInfo, GetLoad and the metrics report about the model and its KV cache."""
        return {"model": self.model_name, "max_model_len": self.max_model_len,
                "block_size": self.args.block_size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "kv_cache_dtype": kv_dtype_name(getattr(self.runner, "kv_dtype", self.dtype)),
                "kv_bytes_per_token": self.runner.kv_bytes_per_token}

    def _notify(self, plan: Plan, duration: float) -> None:
        if not self._listeners or plan.num_seqs == 0:
            return
        nd, nt = int(plan.num_decodes), int(plan.num_tokens)
        q_lens = np.diff(plan.query_start_loc)
        context = float(plan.seq_lens.sum())
        stats = StepStats(
            num_seqs=int(plan.num_seqs), num_tokens=nt, num_prefill_tokens=nt - nd,
            num_decodes=nd, duration_s=duration,
            flops_estimate=self.cost.flops(nt, attention_pairs(q_lens, plan.seq_lens)),
            bytes_estimate=self.cost.bytes_moved(nt, context))
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # a broken listener must not stop serving
                log.exception("step listener failed")


def _error_output(state: RequestState, message: str) -> RequestOutput:
    return RequestOutput(state.request_id, finished=True, finish_reason="error", error=message,
                         num_prompt_tokens=len(state.prompt_token_ids),
                         num_completion_tokens=len(state.output_token_ids))


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _host_tier_settings(runner: Any) -> dict[str, Any]:
    """The core's host-tier switch and the rates the runner measured for its cost model:
    loads at the host->device rate, swaps (out and back in) at the round trip's mean rate,
    recomputing at this device's prefill rate."""
    link, flops = runner.link_bytes_per_s, runner.prefill_flops_per_s
    if not runner.num_host_tier_blocks or link is None or flops is None:
        return {}
    d2h, h2d = link
    return {"host_prefix_cache": True, "load_bytes_per_s": h2d,
            "swap_bytes_per_s": 2.0 / (1.0 / d2h + 1.0 / h2d), "prefill_flops_per_s": flops}
