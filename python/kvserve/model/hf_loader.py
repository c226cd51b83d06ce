"""Hugging Face checkpoint directories: config.json, *.safetensors (+ index), tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from kvserve.json_object import read_json_object
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.config import ModelConfig
from kvserve.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: model config not found")
    raw = read_json_object(config_file)
    try:
        config = ModelConfig.from_hf(raw, name=path.name)
    except ValueError as exc:
        raise type(exc)(f"{config_file}: {exc}") from None
    files = _weight_files(path)
    tokenizer = Tokenizer.from_hf_dir(path, config.eos_token_ids)
    config.eos_token_ids = tokenizer.eos_token_ids
    return Checkpoint(config, lambda dtype: _iter_tensors(files, dtype), tokenizer, str(path))


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: malformed safetensors index: {exc}") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weight files found")
    return files


def _iter_tensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 -- safe_open is not a dict
                    yield name, handle.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{f}: cannot read safetensors file: {exc}") from None
