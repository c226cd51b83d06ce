"""What loading a GGUF file produced, kept on disk so later loads skip the GGUF work.

Reading a GGUF file means parsing its metadata and vocabulary in Python and dequantising
every tensor; both are slow, and both give the same answer every time for the same file.
An entry holds that answer: the ModelConfig and the tokenizer's fields (checkpoint.json),
the tokenizer (tokenizer.json) and, per compute dtype, the model's parameters as the model
holds them (q/k/v and gate/up already fused) in weights-<dtype>.safetensors, which a later
load maps straight into the parameters.

Entries live under <cache dir>/gguf/<file stem>-<key>/, where the key hashes the source's
resolved path, size and mtime (ns) plus the bytes of the code that converts it. The stat
identity costs one stat() per load; hashing the file's contents would cost a full read of it
(the dequantisation this cache exists to skip is barely slower), and hashing only its
header would miss re-quantised weights, which leave the header unchanged. A file replaced
by a different one (download, copy, edit) changes its mtime and so its key.

Every file is written under a temporary name and renamed into place, and each part's
record (checkpoint.json, weights-<dtype>.json) is written last, with the xxh3 checksum and
size of the files it vouches for; a reader checks them before use. So concurrent first
loads each write whole files (the same bytes) and a reader sees old or new, never a mix; a
truncated, corrupt or unreadable entry is reported, rebuilt from the source and never
served. Failing to write the cache (read-only or full disk) never fails the load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from kvserve.model.config import ModelConfig
from kvserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
# The modules whose code decides what an entry holds: a change to any of them is a new key.
_CONVERTER_MODULES = ("gguf_cache.py", "gguf_loader.py", "config.py", "llama.py",
                      "../tokenizer.py")
_CHECKPOINT, _TOKENIZER = "checkpoint.json", "tokenizer.json"
_CHUNK = 16 << 20


class CacheEntryError(Exception):
    """An entry exists but cannot be used (truncated, corrupt, or from other code)."""


@dataclass(frozen=True)
class SourceIdentity:
    path: str  # resolved
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> SourceIdentity:
        resolved = path.resolve()
        st = resolved.stat()
        return cls(str(resolved), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class GGUFCache:
    """One source file's entry directory; a missing or bad entry reads as None."""

    directory: Path
    source: SourceIdentity

    @classmethod
    def for_source(cls, path: Path, root: Path | None = None) -> GGUFCache:
        if root is None:
            from kvserve.default_model import cache_dir

            root = cache_dir()
        source = SourceIdentity.of(path)
        key = hashlib.sha256(json.dumps(
            [FORMAT, dataclasses.asdict(source), _converter_digest()]).encode()).hexdigest()
        return cls(root / "gguf" / f"{Path(source.path).stem}-{key[:20]}", source)

    # ---- config and tokenizer -------------------------------------------------------------

    def load_checkpoint(self) -> tuple[ModelConfig, Tokenizer] | None:
        record_file = self.directory / _CHECKPOINT
        if not record_file.is_file():
            return None
        try:
            record = _read_record(record_file, self.source)
            text = _read_verified(self.directory / _TOKENIZER, record["tokenizer_file"])
            from tokenizers import Tokenizer as HFTokenizer

            tokenizer = Tokenizer(HFTokenizer.from_str(text.decode("utf-8")),
                                  **record["tokenizer"])
            return ModelConfig(**record["config"]), tokenizer
        except Exception as exc:  # noqa: BLE001 -- any failure means: rebuild, never serve
            self._report_bad(record_file, exc)
            return None

    def store_checkpoint(self, config: ModelConfig, tokenizer: Tokenizer) -> None:
        def write() -> None:
            self._prune_stale()
            self.directory.mkdir(parents=True, exist_ok=True)
            text = tokenizer.hf.to_str().encode("utf-8")
            _write_atomic(self.directory / _TOKENIZER, lambda tmp: tmp.write_bytes(text))
            extras = {f.name: getattr(tokenizer, f.name)
                      for f in dataclasses.fields(tokenizer) if f.name != "hf"}
            record = {"format": FORMAT, "source": dataclasses.asdict(self.source),
                      "config": dataclasses.asdict(config), "tokenizer": extras,
                      "tokenizer_file": _file_check(text)}
            _write_json_atomic(self.directory / _CHECKPOINT, record)

        self._best_effort("config and tokenizer", write)

    # ---- weights --------------------------------------------------------------------------

    def load_params(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The parameters saved by store_params, as CPU tensors mapped from the file."""
        weights, record_file = self._weight_files(dtype)
        if not record_file.is_file():
            return None
        try:
            record = _read_record(record_file, self.source)
            _verify_file(weights, record["weights_file"])
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                params = {name: handle.get_tensor(name)
                          for name in handle.keys()}  # noqa: SIM118 -- not a dict
            wrong = [n for n, t in params.items() if t.dtype != dtype]
            if wrong:
                raise CacheEntryError(f"tensor {wrong[0]!r} is not {dtype}")
            return params
        except Exception as exc:  # noqa: BLE001 -- any failure means: rebuild, never serve
            self._report_bad(weights, exc)
            return None

    def store_params(self, dtype: torch.dtype, params: dict[str, torch.Tensor]) -> None:
        weights, record_file = self._weight_files(dtype)
        size = sum(t.numel() * t.element_size() for t in params.values())

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.directory).free
            if size > free // 2:  # a cache must not fill the disk
                log.info("not caching %s weights of %s: %d MiB would take over half of the "
                         "%d MiB free in %s", dtype, self.source.path, size >> 20, free >> 20,
                         self.directory)
                return
            from safetensors.torch import save_file

            tensors = {n: t.detach().contiguous() for n, t in params.items()}
            check = _write_atomic(weights, lambda tmp: save_file(tensors, str(tmp)))
            _write_json_atomic(record_file, {"format": FORMAT,
                                             "source": dataclasses.asdict(self.source),
                                             "weights_file": check})

        self._best_effort(f"{dtype} weights", write)

    # ---- helpers --------------------------------------------------------------------------

    def _weight_files(self, dtype: torch.dtype) -> tuple[Path, Path]:
        stem = f"weights-{str(dtype).removeprefix('torch.')}"
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def _report_bad(self, path: Path, exc: Exception) -> None:
        log.warning("model cache: %s is unusable (%s: %s); rebuilding it from %s", path,
                    type(exc).__name__, exc, self.source.path)

    def _best_effort(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            log.warning("model cache: could not save the %s of %s under %s: %s", what,
                        self.source.path, self.directory, exc)

    def _prune_stale(self) -> None:
        """Drop entries of this path for other identities, and of sources that are gone."""
        for entry in self.directory.parent.glob("*/"):
            if entry == self.directory:
                continue
            try:
                recorded = json.loads((entry / _CHECKPOINT).read_text())["source"]["path"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not an entry this code wrote, or one being written: leave it
            if recorded == self.source.path or not Path(recorded).exists():
                shutil.rmtree(entry, ignore_errors=True)


def _converter_digest() -> str:
    here = Path(__file__).parent
    digest = xxhash.xxh3_64()
    for name in _CONVERTER_MODULES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def _file_check(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "xxh3_64": xxhash.xxh3_64(data).hexdigest()}


def _hash_file(path: Path) -> dict[str, Any]:
    digest, size = xxhash.xxh3_64(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"size": size, "xxh3_64": digest.hexdigest()}


def _verify_file(path: Path, expected: dict[str, Any]) -> None:
    size = path.stat().st_size
    if size != expected["size"]:
        raise CacheEntryError(f"{path.name} has {size} bytes, expected {expected['size']}")
    if _hash_file(path) != expected:
        raise CacheEntryError(f"{path.name} does not match its checksum")


def _read_verified(path: Path, expected: dict[str, Any]) -> bytes:
    data = path.read_bytes()
    if _file_check(data) != expected:
        raise CacheEntryError(f"{path.name} does not match its size and checksum")
    return data


def _read_record(path: Path, source: SourceIdentity) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT or record.get("source") != dataclasses.asdict(source):
        raise CacheEntryError("written for another format or source file")
    return record


def _write_atomic(path: Path, write: Callable[[Path], object]) -> dict[str, Any]:
    """Write through a private temporary name, then rename it over path; returns the
    written file's size and checksum."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        check = _hash_file(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return check


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=1, sort_keys=True)
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
