"""Test helpers: random checkpoints written byte by byte, and real-tokenizer model folders."""

from __future__ import annotations

import json
import lzma
import shutil
import struct
from pathlib import Path

import numpy as np

from qwen_ref.config import QwenConfig
from qwen_ref.weights import expected_shapes

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
TOKENIZER_DIR = TESTS / "data" / "qwen1.5-tokenizer"

_FORMAT = {"F32": "<f4", "F16": "<f2", "BF16": "<f4"}


def bf16_words(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to nearest-even bfloat16, as raw 16-bit words."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write {name: (dtype name F32|F16|BF16, float array)} in the safetensors layout."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        blob = bf16_words(array).tobytes() if dtype == "BF16" else np.asarray(array, _FORMAT[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so tensor data is 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def random_checkpoint(model_dir: Path, config: dict, dtype: str = "F32", seed: int = 0, scale: float = 0.3) -> None:
    """A random-weight checkpoint for `config` (a config.json dict); norms near 1, biases non-zero."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(QwenConfig.from_dict(config)).items():
        if name.endswith("norm.weight"):
            values = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            values = scale * rng.standard_normal(shape)
        tensors[name] = (dtype, values.astype(np.float32))
    write_safetensors(model_dir / "model.safetensors", tensors)


def expected_parameters(c: QwenConfig) -> int:
    """Qwen2ForCausalLM written out: q/k/v projections with biases, o_proj and the SwiGLU MLP without,
    two RMSNorms per layer, a final norm, and an LM head unless it is tied to the embedding."""
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = (D * q + q) + 2 * (D * kv + kv) + q * D
    mlp = 3 * D * F
    layer = attention + mlp + 2 * D
    return V * D + L * layer + D + (0 if c.tie_word_embeddings else V * D)


def small_config(**overrides) -> dict:
    """A config.json dict for a tiny GQA model."""
    config = {
        "model_type": "qwen2", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


def transformers_random_model(torch, transformers, config: dict, seed: int):
    """A random Qwen2ForCausalLM (eager attention) with weights scaled so logits are spread, not flat near zero."""
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
    model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:  # q/k/v biases
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)
    return model.eval()


def with_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a checkpoint folder with the real Qwen1.5 tokenizer added (decompressed from the repo)."""
    shutil.copytree(model_dir, dest)
    (dest / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER_DIR / "tokenizer.json.xz").read_bytes()))
    shutil.copyfile(TOKENIZER_DIR / "tokenizer_config.json", dest / "tokenizer_config.json")
    return dest


# Plain English with numbers, punctuation and non-ASCII words (148 Qwen tokens): for perplexity and scoring.
PROSE = (
    "The quick brown fox jumps over the lazy dog. Perplexity is the exponentiated average negative "
    "log-likelihood of a sequence; a model that assigns high probability to every next token has low "
    "perplexity. With a strided sliding window each token is predicted with as much context as the "
    "window allows, and no token is scored twice. Qwen uses a byte-level BPE tokenizer with a vocabulary "
    "of about 151 thousand entries, so this paragraph of plain English becomes a couple of hundred ids.\n"
    "Numbers like 3.14159 and 2026, punctuation (brackets, commas; semicolons!) and café, naïve, 日本語 "
    "exercise the byte fallback of the tokenizer as well."
)
