"""A tiny random Llama over the embedded SmolLM2 tokenizer's real vocabulary (49 152 tokens),
for structured-output tests: the grammar engine then masks a real byte-level BPE vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tiny_models import save_model_dir


def save_smollm2_vocab_model(path: Path, gguf: Path, seed: int = 5, **overrides: Any) -> Path:
    from kvserve.model.gguf_loader import load_gguf

    tok = load_gguf(gguf).tokenizer  # lazy: reads metadata, never the weights
    eos = tok.eos_token_ids[0]
    bos = tok.hf.token_to_id(tok.bos_token) if tok.bos_token else eos
    shape: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64,
                             "num_attention_heads": 2, "num_key_value_heads": 1}
    save_model_dir(path, "llama", seed=seed, vocab_size=tok.vocab_size,
                   tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                   **{**shape, **overrides})
    tok.hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
         "chat_template": tok.chat_template}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path
