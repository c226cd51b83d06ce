"""End to end on the embedded SmolLM2 (CPU): perplexity with an fp8_e4m3 KV cache within 2%
of the model-dtype (fp32) cache, on a public-domain English text (tests/data/README.md)."""

from __future__ import annotations

from pathlib import Path

from kvserve import LLM
from kvserve.bench.perplexity import perplexity

TEXT = Path(__file__).parent / "data" / "alice_ch1_2.txt"
# A 2048-token slice of the 5.9k-token text keeps the test near a minute on 2 cores; the
# full 4096-token figure is in benches/RESULTS.md (benches/bench_kv_fp8_cpu.py).
TOKENS = 2048


def _perplexity(path: Path, kv_cache_dtype: str) -> float:
    with LLM(str(path), device="cpu", kv_cache_memory="96MiB", max_model_len=TOKENS,
             kv_cache_dtype=kv_cache_dtype) as llm:
        ids = llm.tokenizer.encode(TEXT.read_text())
        assert len(ids) >= 4096  # the committed text is at least 4k tokens
        return perplexity(llm.engine, ids[:TOKENS])


def test_fp8_kv_perplexity_within_2_percent_of_fp32(smollm2_gguf: Path) -> None:
    full = _perplexity(smollm2_gguf, "auto")
    fp8 = _perplexity(smollm2_gguf, "fp8_e4m3")
    assert 1 < full < 100  # the model reads English: a sane perplexity
    assert fp8 != full  # the FP8 path really quantized
    assert abs(fp8 / full - 1) < 0.02, (full, fp8)
