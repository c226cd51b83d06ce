"""`kvserve generate PROMPT`: stream a completion to the terminal."""

from __future__ import annotations

import argparse
import sys

from kvserve.commands.remote_args import add_remote_args
from kvserve.engine_args import EngineArgs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt",
                              description="Stream a completion of PROMPT to the terminal.")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message in the model's chat template")
    EngineArgs.add_cli_args(p)
    add_remote_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.server:  # a running server does the work; nothing is loaded here
        from kvserve.commands.remote import run_remote

        return run_remote(args)
    from kvserve.engine import LLMEngine
    from kvserve.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        engine = LLMEngine(EngineArgs.from_cli_args(args))
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            engine.add_request(None, None, params, messages=messages)
        else:
            engine.add_request(None, args.prompt, params)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"kvserve generate: error: {exc}", file=sys.stderr)
        return 2
    if not args.chat:
        sys.stdout.write(args.prompt)
    done = False
    while not done:
        for delta in engine.step():
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            done = done or delta.finished
    sys.stdout.write("\n")
    return 0
