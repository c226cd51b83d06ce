"""Tiny random Llama-family checkpoints saved as Hugging Face directories, for tests.

A module of its own (not conftest) so test files can import it by a name no other
conftest on sys.path shares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A scheduler decides which sequences run in each step of the engine.",
    "Prefix caching lets requests that share a prompt share its blocks.",
    "Grüße aus München! Ünïcödé tëxt, 日本語のテキスト, emoji 🙂🚀 and more.",
    "numbers 0123456789 and punctuation: ; , . ! ? ( ) [ ] { } < > = + - * /",
] * 4
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A small byte-level BPE trained on CORPUS: ids 0..2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Random-init transformers model of `arch` (llama | qwen2 | mistral) saved with a tokenizer.

    Weights use a wider init than transformers' default (std 0.02) so greedy argmax is decided
    by clear margins, not by float rounding.
    """
    import torch
    import transformers

    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("</s>")
    common: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": eos,
        "tie_word_embeddings": False, "initializer_range": 0.15,
    }
    common.update(overrides)
    cls_cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[arch]
    cls_model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**common)).eval()
    with torch.no_grad():  # random (not ones) norms and biases so every path is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "chat_template": CHAT_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path
