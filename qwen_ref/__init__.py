"""qwen-ref: a NumPy/Numba CPU reference implementation of Qwen1.5 (Qwen2ForCausalLM)."""

from qwen_ref.config import GenerationConfig, QwenConfig, load_config, load_generation_config
from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import KVCache
from qwen_ref.model import QwenModel, load_model

__all__ = [
    "GenerationConfig",
    "KVCache",
    "QwenConfig",
    "QwenModel",
    "QwenRefError",
    "load_config",
    "load_generation_config",
    "load_model",
]
