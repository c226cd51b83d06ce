"""The GGUF cache: a load served from it equals a load from the GGUF file itself (logits,
greedy tokens, tokenizer); a changed source, or a damaged entry, is rebuilt, never served;
concurrent first loads leave one valid entry; a local generate imports no server stack."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvserve.attention import get_backend
from kvserve.attention.base import AttentionMetadata
from kvserve.model import build_model, gguf_loader, load_checkpoint
from kvserve.model.gguf_cache import GGUFCache
from kvserve.model.llama import LlamaModel
from test_model_gguf import write_gguf
from tiny_models import save_model_dir

pytest.importorskip("gguf")

CPU = torch.device("cpu")
BLOCK = 4


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(root))
    return root


def _gguf(tmp_path: Path, name: str = "tiny.gguf", seed: int = 1, **overrides: object) -> Path:
    hf_dir = save_model_dir(tmp_path / f"hf-{name}-{seed}", "llama", seed=seed, **overrides)
    return write_gguf(hf_dir, tmp_path / name, "llama")


def _logits(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of one prefill of tokens (torch backend, fresh cache)."""
    cfg, n = model.config, len(tokens)
    blocks = (n + BLOCK - 1) // BLOCK
    shape = get_backend("torch", "cpu").kv_cache_shape(blocks, BLOCK, cfg.num_kv_heads,
                                                       cfg.head_dim)
    dtype = model.embed_tokens.weight.dtype
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(cfg.num_layers)]
    qsl = torch.tensor([0, n], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=qsl, seq_lens=lens,
        block_table=torch.arange(blocks, dtype=torch.int32)[None], num_decodes=0,
        max_query_len=n, max_seq_len=n, query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), meta, caches))


def _uncached(path: Path, dtype: torch.dtype) -> tuple[LlamaModel, object]:
    ckpt = gguf_loader.load_gguf(path)  # straight from the file: no cache involved
    assert ckpt.cache is None
    return build_model(ckpt, get_backend("torch", "cpu"), 64, dtype, CPU), ckpt.tokenizer


def _cached(path: Path, dtype: torch.dtype) -> tuple[LlamaModel, object]:
    ckpt = load_checkpoint(path)
    assert ckpt.cache is not None
    return build_model(ckpt, get_backend("torch", "cpu"), 64, dtype, CPU), ckpt.tokenizer


def _forbid_gguf_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> None:
        raise AssertionError(f"{path} was parsed although the cache holds it")

    monkeypatch.setattr(gguf_loader, "load_gguf", fail)


def _tokens(seed: int, vocab: int, n: int = 11) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("dtype", "tied"), [(torch.float32, False), (torch.bfloat16, True)])
def test_cached_load_equals_gguf_load(dtype: torch.dtype, tied: bool, tmp_path: Path,
                                      cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _gguf(tmp_path, tie_word_embeddings=tied)
    ref, ref_tok = _uncached(path, dtype)
    cold, cold_tok = _cached(path, dtype)  # converts and writes the entry
    entries = list((cache_dir / "gguf").iterdir())
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == sorted(
        ["checkpoint.json", "tokenizer.json", f"weights-{str(dtype)[6:]}.json",
         f"weights-{str(dtype)[6:]}.safetensors"])
    _forbid_gguf_reads(monkeypatch)
    warm, warm_tok = _cached(path, dtype)
    assert (warm.lm_head.weight is warm.embed_tokens.weight) == tied
    assert warm.config == ref.config
    ref_params = dict(ref.named_parameters())
    for name, param in warm.named_parameters():
        assert param.dtype == dtype and torch.equal(param, ref_params[name]), name
    for seed in range(3):
        tokens = _tokens(seed, ref.config.vocab_size)
        want = _logits(ref, tokens)
        assert torch.equal(_logits(cold, tokens), want)
        assert torch.equal(_logits(warm, tokens), want)
    for text in ["The quick brown fox", "Grüße 日本語 🙂 0123 ( )", "</s> mixed <s>", " \n\t x"]:
        ids = ref_tok.encode(text)  # type: ignore[attr-defined]
        assert warm_tok.encode(text) == cold_tok.encode(text) == ids  # type: ignore[attr-defined]
        assert warm_tok.decode(ids, False) == ref_tok.decode(ids, False)  # type: ignore[attr-defined]
    for field in ("eos_token_ids", "bos_token", "eos_token", "chat_template", "vocab_size"):
        assert getattr(warm_tok, field) == getattr(ref_tok, field), field


def test_cached_engine_greedy_tokens_equal_the_source_checkpoint(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvserve import LLM, SamplingParams

    hf_dir = save_model_dir(tmp_path / "hf", "llama", seed=7)
    path = write_gguf(hf_dir, tmp_path / "tiny.gguf", "llama")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The quick brown fox", "Paged attention stores", "numbers 0123"]

    def greedy(model: Path) -> list[list[int]]:
        llm = LLM(str(model), kv_cache_memory="1MiB", block_size=4)
        return [o.token_ids for o in llm.generate(prompts, params)]

    want = greedy(hf_dir)  # the HF checkpoint the GGUF was written from
    assert greedy(path) == want  # cold: converted and cached
    _forbid_gguf_reads(monkeypatch)
    assert greedy(path) == want  # warm: all from the cache


def test_changed_source_file_is_not_served_from_the_cache(
        tmp_path: Path, cache_dir: Path) -> None:
    path = _gguf(tmp_path, seed=1)
    first, _ = _cached(path, torch.float32)
    first_entry = list((cache_dir / "gguf").iterdir())
    # Same path, other weights (same shapes, so the same size): a rewrite changes the mtime.
    write_gguf(save_model_dir(tmp_path / "hf-other", "llama", seed=2), path, "llama")
    ref, _ = _uncached(path, torch.float32)
    second, _ = _cached(path, torch.float32)
    tokens = _tokens(0, ref.config.vocab_size)
    assert torch.equal(_logits(second, tokens), _logits(ref, tokens))
    assert not torch.equal(_logits(first, tokens), _logits(ref, tokens))
    entries = list((cache_dir / "gguf").iterdir())
    assert len(entries) == 1 and entries != first_entry  # the stale entry was removed


def _damage_weights_truncated(entry: Path) -> None:
    f = entry / "weights-float32.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _damage_weights_flipped_byte(entry: Path) -> None:
    f = entry / "weights-float32.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) * 3 // 4] ^= 0x40  # inside some tensor's data: the header still parses
    f.write_bytes(bytes(data))


def _damage_tokenizer(entry: Path) -> None:
    f = entry / "tokenizer.json"
    f.write_text(f.read_text().replace('"merges"', '"merges_"', 1))


def _damage_record(entry: Path) -> None:
    (entry / "checkpoint.json").write_text('{"format": 1, "source": ')


def _damage_weights_record(entry: Path) -> None:
    f = entry / "weights-float32.json"
    record = json.loads(f.read_text())
    record["weights_file"]["size"] += 1
    f.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", [_damage_weights_truncated, _damage_weights_flipped_byte,
                                    _damage_tokenizer, _damage_record, _damage_weights_record])
def test_damaged_entry_is_rebuilt_not_served(damage: object, tmp_path: Path, cache_dir: Path,
                                             caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = _gguf(tmp_path)
    ref, ref_tok = _uncached(path, torch.float32)
    _cached(path, torch.float32)
    (entry,) = (cache_dir / "gguf").iterdir()
    damage(entry)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="kvserve.model.gguf_cache"):
        model, tok = _cached(path, torch.float32)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    tokens = _tokens(1, ref.config.vocab_size)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    assert tok.encode("The quick brown fox") == ref_tok.encode("The quick brown fox")  # type: ignore[attr-defined]
    caplog.clear()
    _forbid_gguf_reads(monkeypatch)
    model, _ = _cached(path, torch.float32)  # the rebuilt entry serves again
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    assert "unusable" not in caplog.text


def test_unwritable_cache_dir_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(blocker))
    path = _gguf(tmp_path)
    ref, _ = _uncached(path, torch.float32)
    with caplog.at_level(logging.WARNING, logger="kvserve.model.gguf_cache"):
        model, _ = _cached(path, torch.float32)
    assert "could not save" in caplog.text
    tokens = _tokens(2, ref.config.vocab_size)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))


_LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch, xxhash
    from kvserve.attention import get_backend
    from kvserve.model import build_model, load_checkpoint
    model = build_model(load_checkpoint(sys.argv[1]), get_backend("torch", "cpu"), 64,
                        torch.float32, torch.device("cpu"))
    digest = xxhash.xxh3_64()
    for name, p in model.named_parameters():
        digest.update(name.encode()); digest.update(p.detach().numpy().tobytes())
    print(digest.hexdigest())
""")


def _param_digest(model: LlamaModel) -> str:
    import xxhash

    digest = xxhash.xxh3_64()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()


def test_concurrent_first_loads_leave_one_valid_entry(tmp_path: Path, cache_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = _gguf(tmp_path)
    ref, _ = _uncached(path, torch.float32)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_SCRIPT, str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "unusable" not in err, err
    assert {out.strip() for out, _ in results} == {_param_digest(ref)}
    (entry,) = (cache_dir / "gguf").iterdir()
    assert not [f.name for f in entry.iterdir() if f.name.endswith(".tmp")]
    _forbid_gguf_reads(monkeypatch)
    warm, _ = _cached(path, torch.float32)
    assert _param_digest(warm) == _param_digest(ref)


def test_cache_key_follows_the_source_identity(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    first = GGUFCache.for_source(path, tmp_path)
    assert GGUFCache.for_source(path, tmp_path) == first
    os.utime(path, ns=(1, 1))
    assert GGUFCache.for_source(path, tmp_path).directory != first.directory
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    same = GGUFCache.for_source(path, tmp_path).source
    assert GGUFCache.for_source(link, tmp_path).source == same


def test_local_generate_imports_no_server_or_compiler_stack(tmp_path: Path, cache_dir: Path
                                                            ) -> None:
    path = _gguf(tmp_path)
    _cached(path, torch.float32)  # warm the cache the way `generate` on CPU will use it
    code = textwrap.dedent(f"""
        import sys
        from kvserve.cli import main
        assert main(["generate", "--model", {str(path)!r}, "--max-tokens", "3",
                     "--kv-cache-memory", "1MiB", "--swap-space", "0", "hello"]) == 0
        heavy = ("grpc", "gguf", "transformers", "matplotlib", "torch._dynamo", "sympy")
        print("loaded:" + ",".join(m for m in heavy if m in sys.modules))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "loaded:", proc.stdout
