"""`kvserve generate --server HOST:PORT PROMPT`: stream a completion from a running server.

The generate command calls `run_remote(args)` when `args.server` is set; the flags it
needs beyond generate's own come from `add_remote_args(parser)` (commands/remote_args.py,
which imports no grpc, so a local `kvserve generate` never loads it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from kvserve import env
from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub

# generate's flags that map onto kvserve.v1 SamplingParams fields
_SAMPLING_FLAGS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "logprobs",
)


def parse_target(server: str) -> str:
    """HOST:PORT (or [IPv6]:PORT) with a valid port; raises ValueError naming --server."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server: expected HOST:PORT, got {server!r}")
    return server


def open_channel(server: str, *, tls: bool = False, root_cert: Path | None = None) -> grpc.Channel:
    target = parse_target(server)
    if tls or root_cert is not None:
        roots = root_cert.read_bytes() if root_cert is not None else None
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
    return grpc.insecure_channel(target)


def build_request(
    *,
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    sampling: dict[str, Any] | None = None,
    request_id: str | None = None,
    cache_salt: str | None = None,
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id or "")
    given = [x is not None for x in (prompt, prompt_token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, prompt_token_ids, messages")
    if prompt is not None:
        req.prompt = prompt
    elif prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
    else:
        for m in messages or ():
            req.messages.messages.add(role=m["role"], content=m["content"])
    for key, value in (sampling or {}).items():
        if value is None:
            continue
        if key in ("stop", "stop_token_ids"):
            getattr(req.sampling, key).extend(value)
        else:
            setattr(req.sampling, key, value)
    if cache_salt is not None:
        req.cache_salt = cache_salt
    return req


def stream_generate(
    channel: grpc.Channel,
    request: pb.GenerateRequest,
    *,
    api_key: str | None = None,
    timeout: float | None = None,
) -> Iterator[pb.GenerateResponse]:
    """The server's messages as they arrive; grpc.RpcError on failure."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    yield from KvServeStub(channel).Generate(request, metadata=metadata, timeout=timeout)


def generate_remote(
    server: str,
    prompt: str,
    *,
    chat: bool = False,
    sampling: dict[str, Any] | None = None,
    api_key: str | None = None,
    tls: bool = False,
    root_cert: Path | None = None,
    timeout: float | None = None,
    echo_prompt: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the completion as it streams (after the prompt with echo_prompt, as the local
    `kvserve generate` does); 0 on success, 1 on an RPC error (printed)."""
    if chat:
        request = build_request(messages=[{"role": "user", "content": prompt}], sampling=sampling)
    else:
        request = build_request(prompt=prompt, sampling=sampling)
    out = sys.stdout if out is None else out  # looked up now: tests swap sys.stdout
    err = sys.stderr if err is None else err
    api_key = api_key if api_key is not None else env.api_key()
    if echo_prompt:
        out.write(prompt)
    with open_channel(server, tls=tls, root_cert=root_cert) as channel:
        try:
            for msg in stream_generate(channel, request, api_key=api_key, timeout=timeout):
                out.write(msg.text)
                out.flush()
                if msg.finished:
                    out.write("\n")
                    reason = pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_")
                    u = msg.usage
                    print(
                        f"[{reason.lower()}; prompt {u.prompt_tokens} tokens "
                        f"({u.cached_prompt_tokens} cached), completion {u.completion_tokens}]",
                        file=err,
                    )
        except grpc.RpcError as exc:
            out.write("\n")
            trailing: Any = exc.trailing_metadata() or ()  # (key, value) pairs
            hint = dict(trailing).get("retry-after")
            retry = f" (retry after {hint}s)" if hint else ""
            print(f"kvserve: {server}: {exc.code().name}: {exc.details()}{retry}", file=err)
            return 1
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """Entry for `kvserve generate --server ...`; reads generate's own flags when present."""
    sampling = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    chat = bool(getattr(args, "chat", False))
    try:
        return generate_remote(
            args.server,
            args.prompt,
            chat=chat,
            echo_prompt=not chat,
            sampling=sampling,
            api_key=getattr(args, "api_key", None),
            tls=bool(getattr(args, "tls", False)),
            root_cert=getattr(args, "tls_ca", None),
            timeout=getattr(args, "timeout", None),
        )
    except (ValueError, OSError) as exc:
        print(f"kvserve generate: error: {exc}", file=sys.stderr)
        return 2
