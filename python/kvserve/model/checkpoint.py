"""What a loader hands back: the config, a weight stream and the tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvserve.model.config import ModelConfig
from kvserve.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvserve.model.gguf_cache import GGUFCache

WeightStream = Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: WeightStream  # HF-named tensors, converted to the given dtype, read lazily
    tokenizer: Tokenizer
    source: str  # path shown in errors and model_info
    cache: GGUFCache | None = None  # where a GGUF file's converted form is kept
