"""GGUF loading: a tiny HF checkpoint written as GGUF (the way llama.cpp's converter lays it
out, Q/K rows permuted for llama) must load to the same weights and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kvserve.attention import get_backend
from kvserve.model import UnsupportedModelError, build_model, load_checkpoint

gguf = pytest.importorskip("gguf")

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(hf_dir: Path, out: Path, arch: str) -> Path:
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {a["id"]: a["content"] for a in tok["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module>.<proj>.weight
            gname = f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and ".attn_q." in gname:
            t = _permute(t, heads)
        elif arch == "llama" and ".attn_k." in gname:
            t = _permute(t, kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize(("fixture", "arch"), [("tiny_llama_dir", "llama"),
                                               ("tiny_qwen2_dir", "qwen2")])
def test_gguf_loads_like_the_hf_checkpoint(fixture: str, arch: str, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    hf_dir = request.getfixturevalue(fixture)
    path = write_gguf(hf_dir, tmp_path / "tiny.gguf", arch)
    backend, cpu = get_backend("torch", "cpu"), torch.device("cpu")
    ref_ckpt, ckpt = load_checkpoint(hf_dir), load_checkpoint(path)
    assert ckpt.config.attention_bias == (arch == "qwen2")
    ref = build_model(ref_ckpt, backend, 64, torch.float32, cpu).state_dict()
    got = build_model(ckpt, backend, 64, torch.float32, cpu).state_dict()
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    for text in ["The quick brown fox", "Grüße 日本語 🙂 0123 ( )", "</s> mixed <s>"]:
        assert ckpt.tokenizer.encode(text) == ref_ckpt.tokenizer.hf.encode(text).ids, text
    assert ckpt.tokenizer.eos_token_ids == [2]


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load_checkpoint(tmp_path / "x.gguf")


def test_not_a_gguf_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="broken.gguf"):
        load_checkpoint(bad)


def _sentencepiece_gguf(path: Path) -> Path:
    """A SentencePiece-style ("llama") vocabulary: <0xNN> byte tokens, scores, control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tiny_models import CORPUS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [t for t in learned if t not in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from kvserve.model.gguf_loader import _metadata
    from kvserve.tokenizer import Tokenizer

    path = _sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf_metadata(_metadata(gguf.GGUFReader(str(path))), str(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["The quick brown fox", "  two leading spaces", "Grüße 日本語 🙂 (x)",
                 "unseen chars: ЖЩ ∑", "</s> special <s> tokens"]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
