"""The Llama-family model runtime: config, loaders (HF safetensors, GGUF) and the torch model."""

from kvserve.model.checkpoint import Checkpoint
from kvserve.model.config import ModelConfig, UnsupportedModelError
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import build_model, load_checkpoint

__all__ = ["Checkpoint", "LlamaModel", "ModelConfig", "UnsupportedModelError", "build_model",
           "load_checkpoint"]
