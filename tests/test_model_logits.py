"""The torch model over the paged cache vs transformers, no Rust core involved.

Random prompts of different lengths run as (1) a mixed batch of whole-prompt prefills and
(2) chunked prefill + decodes over randomly placed blocks; every logit row must match
transformers' full forward on the same tokens to 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kvserve.attention import get_backend
from kvserve.attention.base import AttentionMetadata
from kvserve.model import build_model, load_checkpoint

BLOCK = 4


def _meta(chunks: list[tuple[int, int]], tables: list[list[int]], num_decodes: int
          ) -> tuple[AttentionMetadata, torch.Tensor]:
    """chunks: (cached, new) per sequence; returns metadata and the positions."""
    qsl = [0]
    slots, positions = [], []
    for (cached, new), table in zip(chunks, tables):
        qsl.append(qsl[-1] + new)
        for p in range(cached, cached + new):
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
    width = max(len(t) for t in tables)
    bt = torch.full((len(tables), width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    q = torch.tensor(qsl, dtype=torch.int32)
    lens = torch.tensor([c + n for c, n in chunks], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), q, lens, bt, num_decodes,
                             max(n for _, n in chunks), int(lens.max()), q, lens)
    return meta, torch.tensor(positions)


def _reference_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [ref(torch.tensor([p])).logits[0] for p in prompts]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-4, f"relative error {err:.2e}"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_tied_dir",
                                     "tiny_mistral_dir"])
def test_paged_forward_matches_transformers(fixture: str, request: pytest.FixtureRequest
                                            ) -> None:
    path = request.getfixturevalue(fixture)
    gen = torch.Generator().manual_seed(hash(fixture) % 2**31)
    ckpt = load_checkpoint(path)
    backend = get_backend("torch", "cpu")
    model = build_model(ckpt, backend, 512, torch.float32, torch.device("cpu"))
    cfg = ckpt.config
    vocab = cfg.vocab_size
    lengths = [int(x) for x in torch.randint(2, 40, (5,), generator=gen)]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    want = _reference_logits(path, prompts)

    num_blocks = 64
    shape = backend.kv_cache_shape(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.num_layers)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:  # random, disjoint block placement per sequence
        k = (n + BLOCK - 1) // BLOCK
        tables.append(perm[:k])
        perm = perm[k:]

    # Step 1: every prompt except its last 1..3 tokens, as ragged prefills in one batch.
    split = [max(1, n - int(torch.randint(1, 4, (1,), generator=gen))) for n in lengths]
    meta, pos = _meta([(0, s) for s in split], tables, num_decodes=0)
    ids = torch.tensor([t for p, s in zip(prompts, split) for t in p[:s]])
    hidden = model(ids, pos, meta, caches)
    rows = meta.query_start_loc[1:].long() - 1
    logits = model.compute_logits(hidden)
    for i, s in enumerate(split):
        start = int(meta.query_start_loc[i])
        _assert_close(logits[start : start + s], want[i][:s])

    # Step 2: sequences with one token left are decodes (first), the others chunk-prefill.
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] - split[i] != 1)
    nd = sum(lengths[i] - split[i] == 1 for i in order)
    chunks = [(split[i], lengths[i] - split[i]) for i in order]
    meta, pos = _meta(chunks, [tables[i] for i in order], num_decodes=nd)
    ids = torch.tensor([t for i in order for t in prompts[i][split[i]:]])
    hidden = model(ids, pos, meta, caches)
    rows = meta.query_start_loc[1:].long() - 1
    last = model.compute_logits(hidden[rows])
    for j, i in enumerate(order):
        _assert_close(last[j], want[i][-1])


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_checkpoint(tmp_path)


def test_missing_and_malformed_files_are_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_checkpoint(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "tokenizer.json").write_text((tiny_llama_dir / "tokenizer.json").read_text())
    ckpt = load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors"):
        build_model(ckpt, get_backend("torch", "cpu"), 64, torch.float32, torch.device("cpu"))


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path: Path, tiny_llama_dir: Path
                                                      ) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_llama_dir / name).read_text())
    backend = get_backend("torch", "cpu")
    cpu = torch.device("cpu")
    whole = build_model(load_checkpoint(tiny_llama_dir), backend, 64, torch.float32, cpu)
    shards = build_model(load_checkpoint(tmp_path), backend, 64, torch.float32, cpu)
    for (name, a), (_, b) in zip(whole.state_dict().items(), shards.state_dict().items()):
        assert torch.equal(a, b), name
    # A shard listed in the index but missing is named.
    next(tmp_path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-0000"):
        load_checkpoint(tmp_path)
