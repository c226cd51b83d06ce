"""End-to-end decode on a GPU: a Llama-3-8B-shaped model with random bf16 weights.

Not a test. One run prints a table and writes JSON:
- the card's ceilings, measured in this run: device-to-device copy bandwidth (bytes read +
  written) and the bf16 8192^3 matmul rate;
- kvserve's decode step (schedule -> forward -> greedy sample -> commit, the engine's real
  loop) at batch 1..256 with 1k-token contexts: step time, tokens/s, model bandwidth
  utilisation = (weight bytes read + KV bytes read) / step time / copy bandwidth, and
  achieved FLOP/s against the matmul rate. Weight bytes read: every parameter but the
  embedding table, plus the B rows of it the step gathers (LlamaModel.weight_bytes_read);
- Hugging Face transformers generate() on the same weights (static cache) at batch 1 and 64,
  decode tokens/s by the difference of two generation lengths (prefill cancels out).

    python benches/gpu/bench_e2e.py --out bench_out/e2e.json [--layers 32] [--enforce-eager]
        [--kv-cache-dtype fp8_e4m3]

KV bytes are the cache's own (1 byte per element for fp8_e4m3); "roofline" is the step time
max(bytes / copy, FLOPs / matmul rate) over the measured one.

(or benches/gpu/run.sh bench, which runs it beside the attention benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_attention import copy_bandwidth, matmul_rate

LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_hf(shapes: dict, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shapes)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    return model.eval()


def hf_decode_tokens_per_s(model, batch: int, ctx: int, short: int, long: int) -> float:
    ids = torch.randint(1000, model.config.vocab_size, (batch, ctx), device=model.device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        _sync()
        t = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        _sync()
        return time.perf_counter() - t

    gen(short)  # warm-up (static cache allocation, kernels)
    t_short = min(gen(short) for _ in range(2))
    t_long = min(gen(long) for _ in range(2))
    return batch * (long - short) / (t_long - t_short)


def build_kvserve(hf_model, shapes: dict, args):
    from kvserve import _core
    from kvserve.attention import get_backend
    from kvserve.attention.kv_quant import check_kv_cache_dtype
    from kvserve.model import Checkpoint, ModelConfig
    from kvserve.runner import ModelRunner

    c = shapes
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"],
        name="llama3-8b-shapes-random",
    )

    def weights(dtype: torch.dtype):
        for name, tensor in hf_model.state_dict().items():
            yield name, tensor.to(dtype)

    ckpt = Checkpoint(config=cfg, weights=weights, tokenizer=None, source="random weights")
    device = hf_model.device
    backend = get_backend(args.attention_backend, device)
    kv_dtype = check_kv_cache_dtype(backend, args.kv_cache_dtype, hf_model.dtype, cfg.head_dim)
    max_len = args.ctx + args.decode_steps + 64
    kv_bytes = args.kv_cache_memory  # used on CPU only; CUDA profiles free memory
    runner = ModelRunner(
        ckpt,
        backend,
        device,
        hf_model.dtype,
        args.block_size,
        max_len,
        args.max_num_batched_tokens,
        max(args.batches),
        kv_bytes,
        args.gpu_memory_utilization,
        0,
        kv_dtype=kv_dtype,
        **_graph_kwargs(args),
    )
    core = _core.Core(
        num_gpu_blocks=runner.num_blocks,
        block_size=args.block_size,
        max_num_seqs=max(args.batches),
        max_model_len=max_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    return runner, core, cfg


def _graph_kwargs(args) -> dict:
    import inspect

    from kvserve.runner import ModelRunner

    # CUDA-graph decode is a runner option where the runner has it.
    if "enforce_eager" in inspect.signature(ModelRunner.__init__).parameters:
        return {"enforce_eager": args.enforce_eager}
    return {}


def step(runner, core) -> tuple[int, int]:
    plan = core.schedule()
    # Every row greedy, no logprobs: as the engine says for such a batch (run-ahead allowed).
    logits = runner.execute(plan, greedy_only=True)
    # The engine's greedy path: the argmax the decode graph computed, else one argmax.
    greedy = getattr(runner, "last_greedy", None)
    if logits is None:
        tokens = np.zeros(0, np.int64)
    else:
        tokens = (greedy if greedy is not None else logits.argmax(-1)).cpu().numpy()
    core.commit(plan.id, tokens)
    return int(plan.num_seqs), int(plan.num_decodes)


def kvserve_decode(runner, core, cfg, batch: int, args) -> dict:
    rng = np.random.default_rng(batch)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(
            rid, rng.integers(1000, cfg.vocab_size, args.ctx), max_tokens=10_000, ignore_eos=True
        )
    while True:  # prefill every sequence first
        seqs, decodes = step(runner, core)
        if seqs == batch and decodes == batch:
            break
    for _ in range(3):
        step(runner, core)
    _sync()
    times = []
    for _ in range(args.decode_steps):
        t = time.perf_counter()
        step(runner, core)  # ends in a device->host copy of the sampled ids: synchronous
        times.append(time.perf_counter() - t)
    for rid in ids:
        core.abort(rid)
    step_s = float(np.median(times))
    # Bytes a step really reads: the embedding table counts only its B gathered rows.
    weight_bytes = runner.model.weight_bytes_read(batch)
    all_params = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    ctx = args.ctx + args.decode_steps // 2 + 4  # mean context while timing
    kv_bytes = batch * ctx * runner.kv_bytes_per_token
    flops = batch * (
        cfg.flops_per_token + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * ctx
    )
    return {
        "batch": batch,
        "step_ms": step_s * 1e3,
        "tokens_per_s": batch / step_s,
        "weight_bytes": weight_bytes,
        "param_bytes": all_params,  # every parameter, the embedding table whole
        "kv_bytes": kv_bytes,
        "bytes_per_s": (weight_bytes + kv_bytes) / step_s,
        "flops_per_s": flops / step_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/e2e.json")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--hf-batches", default="1,64")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="a tiny fp32 model on the CPU: checks the script, measures nothing",
    )
    p.add_argument("--kv-cache-memory", type=int, default=64 << 20, help="CPU only")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, bfloat16, float16, fp8_e4m3")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    shapes = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    if args.smoke_cpu:
        shapes.update(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        card, copy_bw, mm_rate = "cpu (smoke)", 1e10, 1e11
        hf_model = build_hf(shapes, "cpu").float()
    else:
        card = torch.cuda.get_device_name()
        # The ceilings, measured the same way as for the attention kernels (TB/s, TFLOP/s).
        copy_bw, mm_rate = copy_bandwidth() * 1e12, matmul_rate() * 1e12
        hf_model = build_hf(shapes)
    print(f"{card}: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s")

    hf = {}
    if not args.skip_hf:
        for b in (int(x) for x in args.hf_batches.split(",")):
            hf[b] = hf_decode_tokens_per_s(hf_model, b, args.ctx, 16, 48)
            print(f"transformers generate (static cache) batch {b}: {hf[b]:.1f} tok/s")
    runner, core, cfg = build_kvserve(hf_model, shapes, args)
    del hf_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    rows = []
    for b in args.batches:
        r = kvserve_decode(runner, core, cfg, b, args)
        r["mbu"] = r["bytes_per_s"] / copy_bw
        r["mfu"] = r["flops_per_s"] / mm_rate
        r["roofline"] = max(r["mbu"], r["mfu"])  # roofline step time / measured step time
        if b in hf:
            r["transformers_tokens_per_s"] = hf[b]
            r["speedup_vs_transformers"] = r["tokens_per_s"] / hf[b]
        rows.append(r)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "card": card,
                "copy_bytes_per_s": copy_bw,
                "matmul_flops_per_s": mm_rate,
                "layers": args.layers,
                "ctx": args.ctx,
                "enforce_eager": args.enforce_eager,
                "backend": runner.backend.name,
                "kv_cache_dtype": args.kv_cache_dtype,
                "kv_bytes_per_token": runner.kv_bytes_per_token,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(
        f"\nkvserve decode, Llama-3-8B shapes ({args.layers} layers), ctx {args.ctx}, "
        f"backend {runner.backend.name}, {'eager' if args.enforce_eager else 'graphs'}, "
        f"KV {args.kv_cache_dtype} ({runner.kv_bytes_per_token} bytes/token)"
    )
    print(
        f"{'batch':>5} {'step ms':>8} {'tok/s':>9} {'GB/s':>7} {'MBU':>6} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'roofline':>8} {'vs HF':>7}"
    )
    for r in rows:
        vs = f"{r['speedup_vs_transformers']:.1f}x" if "speedup_vs_transformers" in r else "-"
        print(
            f"{r['batch']:>5} {r['step_ms']:>8.2f} {r['tokens_per_s']:>9.0f} "
            f"{r['bytes_per_s'] / 1e9:>7.0f} {r['mbu']:>6.1%} {r['flops_per_s'] / 1e12:>8.1f} "
            f"{r['mfu']:>6.1%} {r['roofline']:>8.1%} {vs:>7}"
        )


if __name__ == "__main__":
    main()
