"""The host KV tier on a GPU: a Llama-3-8B-shaped model (random bf16 weights) with a GPU KV
pool capped far below the working set. Not a test. One run prints a table and writes JSON:

- the host link's bandwidth each way, measured in this run (the engine's start-up probe
  between the device and the pinned pool, and again at the end);
- TTFT of a returning turn at each context (8k and 32k by default): N conversations of that
  length each take a first turn, pushing the earlier ones out of the GPU pool, then each
  returns with a few new tokens; with the host tier its prefix loads over the host link, with
  the tier off (recompute) it is prefilled again. Goals: 8x lower TTFT at 8k, 12x at 32k;
- decode inter-token latency of running requests while offloads run in the background:
  decoders at a short context while long conversations finish beside them (their blocks are
  offloaded as they go idle), tier on against tier off on the same workload. Goal: at most
  5% worse.

    python benches/gpu/make_random_llama.py /tmp/llama8b --max-position-embeddings 40960
    python benches/gpu/bench_host_tier.py --model /tmp/llama8b --out bench_out/host_tier.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def build(model: str, host_kv_cache: str, gpu_blocks: int, max_model_len: int,
          max_tokens_per_step: int) -> Any:
    from kvserve import LLM

    return LLM(model=model, dtype="bfloat16", attention_backend="cuda", block_size=16,
               max_model_len=max_model_len, max_num_batched_tokens=max_tokens_per_step,
               max_num_seqs=64, num_gpu_blocks_override=gpu_blocks,
               host_kv_cache=host_kv_cache, gpu_memory_utilization=0.9)


def free(llm: Any) -> None:
    llm.close()
    gc.collect()
    torch.cuda.empty_cache()


def ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(1000, vocab, (n,), generator=gen).tolist()


def returning_ttft(llm: Any, ctx: int, convs: int, new_tokens: int, vocab: int,
                   seed: int) -> dict[str, Any]:
    """Each conversation's first turn (ctx tokens), then each returns: TTFT (one output
    token) of the returning turns, and the prompt tokens they found cached."""
    from kvserve import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    firsts = [ids(ctx, vocab, gen) for _ in range(convs)]
    for prompt in firsts:
        llm.generate(None, one, prompt_token_ids=[prompt])
    ttft, cached = [], []
    for prompt in firsts:
        turn = prompt + ids(new_tokens, vocab, gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate(None, one, prompt_token_ids=[turn])[0]
        ttft.append(time.perf_counter() - t0)
        cached.append(out.num_cached_prompt_tokens)
    m = llm.engine.metrics()
    return {"ttft_s": ttft, "ttft_median_s": float(np.median(ttft)), "cached_tokens": cached,
            "prefix_hits_host_tokens": m.get("prefix_hits_host_tokens", 0),
            "host_loaded_bytes": m.get("host_loaded_bytes", 0)}


def decode_itl(llm: Any, decoders: int, decode_ctx: int, decode_tokens: int, long_ctx: int,
               longs: int, vocab: int, seed: int) -> dict[str, Any]:
    """Inter-token gaps of `decoders` running requests while `longs` long prompts arrive one
    after another beside them and finish (one token each), their blocks going idle."""
    from kvserve import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    engine = llm.engine
    decode = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    dec_ids = {engine.add_request(None, None, decode, prompt_token_ids=ids(decode_ctx, vocab,
                                                                          gen)).request_id
               for _ in range(decoders)}
    last: dict[str, float] = {}
    gaps: list[float] = []
    offload_steps = 0
    step = 0
    every = max(1, decode_tokens // (longs + 1))
    while engine.has_unfinished():
        if step and step % every == 0 and step // every <= longs:
            engine.add_request(None, None, one, prompt_token_ids=ids(long_ctx, vocab, gen))
        before = engine.metrics().get("host_offloaded_blocks", 0)
        outs = engine.step()
        torch.cuda.synchronize()
        now = time.perf_counter()
        offload_steps += engine.metrics().get("host_offloaded_blocks", 0) > before
        for o in outs:
            if o.request_id in dec_ids and o.token_ids:
                if o.request_id in last:
                    gaps.append(now - last[o.request_id])
                last[o.request_id] = now
        step += 1
    g = np.array(gaps)
    return {"itl_mean_s": float(g.mean()), "itl_p50_s": float(np.median(g)),
            "itl_p99_s": float(np.percentile(g, 99)), "steps_with_offloads": int(offload_steps),
            "host_offloaded_bytes": engine.metrics().get("host_offloaded_bytes", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="benches/gpu/make_random_llama.py output")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--host-kv-cache", default="24GiB")
    ap.add_argument("--out", default="bench_out/host_tier.json")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.new_tokens + 64
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "ttft": {}, "itl": {}}
    for ctx in contexts:
        # Room for about 1.5 conversations: each first turn pushes the one before out.
        blocks = (3 * ctx // 2 + args.new_tokens) // 16 + 8
        row: dict[str, Any] = {"gpu_blocks": blocks}
        for name, tier in (("recompute", "0"), ("host_tier", args.host_kv_cache)):
            llm = build(args.model, tier, blocks, max_len, 8192)
            if tier != "0":
                d2h, h2d = llm.engine.runner.link_bytes_per_s
                report["link_at_start_gb_s"] = {"d2h": d2h / 1e9, "h2d": h2d / 1e9}
            row[name] = returning_ttft(llm, ctx, args.conversations, args.new_tokens, vocab,
                                       seed=ctx)
            if tier != "0":
                d2h, h2d = llm.engine.runner.copier.measure_bandwidth()
                report["link_at_end_gb_s"] = {"d2h": d2h / 1e9, "h2d": h2d / 1e9}
            free(llm)
        row["speedup"] = row["recompute"]["ttft_median_s"] / row["host_tier"]["ttft_median_s"]
        report["ttft"][ctx] = row
        recompute, tiered = row["recompute"]["ttft_median_s"], row["host_tier"]["ttft_median_s"]
        print(f"ctx {ctx}: returning-turn TTFT recompute {recompute * 1e3:.1f} ms, host tier "
              f"{tiered * 1e3:.1f} ms "
              f"({row['speedup']:.1f}x; cached {row['host_tier']['cached_tokens']})", flush=True)
    for name, tier in (("tier_off", "0"), ("tier_on", args.host_kv_cache)):
        llm = build(args.model, tier, 4096, 8192 + 64, 2048)
        report["itl"][name] = decode_itl(llm, decoders=16, decode_ctx=1024, decode_tokens=256,
                                         long_ctx=8192, longs=4, vocab=vocab, seed=1)
        free(llm)
    on, off = report["itl"]["tier_on"], report["itl"]["tier_off"]
    report["itl"]["mean_ratio"] = on["itl_mean_s"] / off["itl_mean_s"]
    print(f"decode ITL b16 ctx1k beside 8k offloads: mean {off['itl_mean_s']*1e3:.2f} -> "
          f"{on['itl_mean_s']*1e3:.2f} ms ({report['itl']['mean_ratio']:.3f}x), p99 "
          f"{off['itl_p99_s']*1e3:.2f} -> {on['itl_p99_s']*1e3:.2f} ms; "
          f"{on['steps_with_offloads']} steps offloaded {on['host_offloaded_bytes']/1e9:.2f} GB")
    print(f"host link at start {report.get('link_at_start_gb_s')}, at end "
          f"{report.get('link_at_end_gb_s')} GB/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
