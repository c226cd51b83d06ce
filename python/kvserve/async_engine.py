"""The asyncio face of the engine, for the server: streams of deltas, a step thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvserve.engine import LLMEngine, StepListener
from kvserve.engine_args import EngineArgs
from kvserve.outputs import RequestOutput
from kvserve.request_state import RequestState
from kvserve.sampling_params import SamplingParams
from kvserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Threads that tokenize and render chat templates. The tokenizer releases the GIL while it
# works, so two keep the loop free without oversubscribing the cores the step loop needs.
PROMPT_WORKERS = 2


@dataclass
class _Stream:
    """Where a queued request's deltas go."""

    request_id: str
    queue: asyncio.Queue[RequestOutput]


class AsyncEngine:
    """Loads the model at construction; `start()` launches the step loop in a thread so the
    event loop never waits on the forward pass."""

    def __init__(self, args: EngineArgs) -> None:
        self.engine = LLMEngine(args)
        # Open streams by the core's handle (the one key of a live request in Python),
        # registered under the engine lock as the request is queued.
        self._streams: dict[int, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._prompt_pool: ThreadPoolExecutor | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_info(self) -> dict[str, Any]:
        return self.engine.model_info

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._prompt_pool = ThreadPoolExecutor(PROMPT_WORKERS, thread_name_prefix="kvserve-prompt")
        self._thread = threading.Thread(target=self._run, name="kvserve-step", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        for stream in list(self._streams.values()):
            self.abort(stream.request_id)
        if self._prompt_pool is not None:
            self._prompt_pool.shutdown(wait=False, cancel_futures=True)
            self._prompt_pool = None

    async def generate(self, prompt: str | None, params: SamplingParams, *,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       messages: list[dict[str, Any]] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Deltas of one request. Bad input or a full queue raises at the first __anext__,
        before anything is queued; leaving the loop early (cancel, aclose) aborts it.

        A full queue is refused first, before any work. The prompt is tokenized (its chat
        template rendered) and queued on a worker thread: the event loop neither tokenizes
        nor waits for the core lock, which the step thread holds through schedule and commit.
        """
        if self._thread is None or self._prompt_pool is None:
            raise RuntimeError("AsyncEngine.start() has not been awaited")
        engine = self.engine
        if not engine.admitting():
            raise engine.at_capacity_error()
        request_id = request_id or uuid.uuid4().hex
        engine.check_params(params)
        stream = _Stream(request_id, asyncio.Queue())
        queued = self._prompt_pool.submit(self._add, stream, prompt, params, prompt_token_ids,
                                          messages, cache_salt)
        try:
            handle = await asyncio.wrap_future(queued)
        except BaseException:  # cancelled or closed: it may still be queued; abort it then
            queued.add_done_callback(lambda f: self._abort_if_added(request_id, f))
            raise
        if self._stop:  # shut down while it was being queued: its stream ends at once
            self.abort(request_id)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.pop(handle, None) is not None and not finished:
                engine.abort(request_id)

    def _add(self, stream: _Stream, prompt: str | None, params: SamplingParams,
             prompt_token_ids: list[int] | None, messages: list[dict[str, Any]] | None,
             cache_salt: str | None) -> int:
        """Encode and queue a request (on a worker thread); its handle."""
        ids = self.engine.encode_prompt(prompt, prompt_token_ids, messages)
        grammar = self.engine.compile_grammar(params)

        def register(state: RequestState) -> None:
            self._streams[state.handle] = stream

        state = self.engine.add_encoded(stream.request_id, ids, params, cache_salt, grammar,
                                        on_added=register)
        self._wake.set()
        return state.handle

    async def tokenize(self, text: str | None, messages: list[dict[str, Any]] | None,
                       add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a text or a conversation (rendered with the chat template, which
        writes its own special tokens), computed on a worker thread like generate's."""
        if self._prompt_pool is None:
            raise RuntimeError("AsyncEngine.start() has not been awaited")
        return await asyncio.get_running_loop().run_in_executor(
            self._prompt_pool, self._tokenize, text, messages, add_special_tokens)

    def _tokenize(self, text: str | None, messages: list[dict[str, Any]] | None,
                  add_special_tokens: bool | None) -> list[int]:
        tok = self.tokenizer
        if messages is not None:
            return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        return tok.encode(text or "", add_special_tokens=add_special_tokens is not False)

    def num_unfinished(self) -> int:
        """Requests queued or running, without the core lock (cheap enough for a refusal)."""
        return self.engine.num_unfinished()

    def abort(self, request_id: str) -> bool:
        """End a live request; its stream gets a final "abort" item. False when not live."""
        handle = self.engine.abort_request(request_id)
        if handle is None:
            return False
        stream = self._streams.pop(handle, None)
        if stream is not None and self._loop is not None:
            final = RequestOutput(request_id, finished=True, finish_reason="abort")
            self._loop.call_soon_threadsafe(stream.queue.put_nowait, final)
        return True

    def load(self) -> dict[str, Any]:
        m = self.engine.metrics()
        load = dict(m)
        load.update(kv_usage=m.get("gpu_kv_usage", 0.0), host_kv_usage=m.get("host_kv_usage", 0.0),
                    running=m.get("running", 0), waiting=m.get("waiting", 0),
                    swapped=m.get("swapped", 0),
                    tokens_last_step=m.get("tokens_scheduled_last_step", 0),
                    prefix_hit_rate=m.get("prefix_hit_rate", 0.0),
                    admitting=m.get("waiting", 0) < self.engine.args.max_waiting)
        info = self.engine.model_info
        load.update(kv_cache_dtype=info["kv_cache_dtype"],
                    kv_bytes_per_token=info["kv_bytes_per_token"])
        return load

    def add_step_listener(self, fn: StepListener) -> None:
        self.engine.add_step_listener(fn)

    @property
    def kv_event_source(self) -> LLMEngine:
        """The engine's prefix-cache event log (kvserve.server.kv_events)."""
        return self.engine

    # ---- the step thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step_by_handle()
            except Exception:  # keep the loop alive; the failure is logged
                log.exception("engine step raised")
                continue
            if deltas and self._loop is not None:
                self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _deliver(self, deltas: dict[int, RequestOutput]) -> None:
        for handle, d in deltas.items():
            stream = self._streams.get(handle)
            if stream is not None:
                stream.queue.put_nowait(d)

    def _abort_if_added(self, request_id: str, queued: Future[int]) -> None:
        """A request whose stream was left while it was being queued: drop both."""
        if not queued.cancelled() and queued.exception() is None:
            self._streams.pop(queued.result(), None)
            self.engine.abort(request_id)
