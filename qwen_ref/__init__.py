"""qwen-ref: a NumPy/Numba CPU reference implementation of Qwen1.5 (Qwen2ForCausalLM)."""

from importlib import metadata

from qwen_ref.compare import LogitReport, assert_logits_close, compare_logits
from qwen_ref.config import (
    GenerationConfig,
    QwenConfig,
    load_config,
    load_generation_config,
)
from qwen_ref.errors import QwenRefError
from qwen_ref.generation import logits_for_tokens
from qwen_ref.kv_cache import KVCache
from qwen_ref.model import QwenModel, load_model

try:
    __version__ = metadata.version("qwen-ref")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "source"

__all__ = [
    "GenerationConfig",
    "KVCache",
    "LogitReport",
    "QwenConfig",
    "QwenModel",
    "QwenRefError",
    "assert_logits_close",
    "compare_logits",
    "load_config",
    "load_generation_config",
    "load_model",
    "logits_for_tokens",
]
