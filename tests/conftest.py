"""Shared fixtures: tiny random Llama-family checkpoints saved as Hugging Face directories.

`tiny_llama_dir` (session-scoped) is the one other test files reuse: a random-init
LlamaForCausalLM with grouped-query attention, safetensors weights, a byte-level BPE
tokenizer.json trained here, tokenizer_config.json (chat template) and generation_config.json
(eos). The builders live in tiny_models.py. `smollm2_gguf` is the embedded default model
(the tests that need it skip where it cannot be had).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import save_model_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with GQA (4 query heads, 2 KV heads), untied embeddings."""
    return save_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: q/k/v projections with bias."""
    return save_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with tied input/output embeddings and llama3 RoPE scaling."""
    return save_model_dir(
        tmp_path_factory.mktemp("tiny_tied"), "llama", seed=3, tie_word_embeddings=True,
        num_key_value_heads=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral (Llama-shaped; a sliding window larger than any test sequence)."""
    return save_model_dir(tmp_path_factory.mktemp("tiny_mistral"), "mistral", seed=4,
                          sliding_window=4096)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model's GGUF file (skips where it cannot be had)."""
    from kvserve.default_model import default_model_path

    try:
        return default_model_path()
    except RuntimeError as exc:  # no network and not installed
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def tiny_smollm2_vocab_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """Tiny random Llama over the embedded SmolLM2 tokenizer (real 49k vocabulary)."""
    from tiny_structured import save_smollm2_vocab_model

    return save_smollm2_vocab_model(tmp_path_factory.mktemp("tiny_smollm2_vocab"), smollm2_gguf)
