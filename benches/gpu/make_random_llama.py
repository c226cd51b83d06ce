"""Write a Hugging Face Llama directory with random bf16 weights (Llama-3-8B shapes by
default) and a small byte-level BPE tokenizer, for timing runs that need a model path.

    python benches/gpu/make_random_llama.py OUT_DIR [--layers 32] [--max-position-embeddings N]

Weights are drawn on the GPU (N(0, 0.02), norms 1) one layer at a time and saved as one
safetensors file per layer; the tokenizer is tests/tiny_models.py's (ids past its vocabulary
decode to nothing, which timing runs do not mind).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-position-embeddings", type=int,
                    default=LLAMA3_8B["max_position_embeddings"],
                    help="longest context the config allows (the host tier bench needs 32k+)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**LLAMA3_8B, "num_hidden_layers": args.layers,
           "max_position_embeddings": args.max_position_embeddings}
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def ones() -> torch.Tensor:  # one tensor per norm: safetensors refuses shared ones
        return torch.ones(h, dtype=torch.bfloat16)
    save_file({"model.embed_tokens.weight": rand(v, h), "model.norm.weight": ones(),
               "lm_head.weight": rand(v, h)}, str(out / "model-embed.safetensors"))
    for n in range(args.layers):
        p = f"model.layers.{n}."
        save_file({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight":
                   rand(kv, h), p + "self_attn.v_proj.weight": rand(kv, h),
                   p + "self_attn.o_proj.weight": rand(h, h), p + "mlp.gate_proj.weight":
                   rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                   p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": ones(),
                   p + "post_attention_layernorm.weight": ones()},
                  str(out / f"model-layer{n:03d}.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_models import build_tokenizer

    build_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    print(f"wrote {out} ({args.layers} layers)")


if __name__ == "__main__":
    main()
