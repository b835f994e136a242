"""The Qwen2ForCausalLM forward pass, written once against the operations of a backend.

Each line names the intermediate after llama.cpp's Qwen2 graph (attn_norm, Qcur, Kcur, Vcur,
kqv_out, ffn_inp, ffn_norm, ffn_out, l_out, result_norm) so the two can be compared layer by layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_ref.backends import NUMPY, Backend
from qwen_ref.config import QwenConfig, load_config
from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import DEFAULT_KV_DTYPE, KVCache, check_kv_dtype
from qwen_ref.memory import keep_freed_memory
from qwen_ref.rope import rope_cos_sin, rope_inv_freq
from qwen_ref.weights import load_weights, to_float32


class QwenModel:
    """Qwen2ForCausalLM: embeddings, L decoder layers, final RMSNorm, LM head."""

    def __init__(self, config: QwenConfig, weights: dict[str, np.ndarray], backend: Backend = NUMPY,
                 kv_dtype: str = DEFAULT_KV_DTYPE):
        check_kv_dtype(kv_dtype)
        self.config = config
        self.weights = weights
        self.backend = backend
        self.kv_dtype = kv_dtype  # of the caches new_cache makes (qwen_ref.kv_cache.KV_DTYPES)
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)  # [hd/2]
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.lm_head = weights[head]  # [V, D]
        # the layers of a one-token step in one call, where the backend has that (numba): the same
        # operations as _decoder_layer without Python between them. Only with this backend: one swapped
        # in later (timing or recording each operation) runs them one by one.
        self.stack_backend = backend
        self.decoder_stack = None if backend.decoder_stack is None else backend.decoder_stack(
            [self._layer_weights(i) for i in range(config.num_hidden_layers)],
            config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps)

    def _layer_weights(self, i: int) -> dict[str, np.ndarray | None]:
        """Layer i's weights under the names `jitkernels.decode.DecoderStack` takes."""
        p, W = f"model.layers.{i}.", self.weights
        a, m = p + "self_attn.", p + "mlp."
        return {"attn_norm": W[p + "input_layernorm.weight"], "ffn_norm": W[p + "post_attention_layernorm.weight"],
                **{n: W[f"{a}{n}_proj.weight"] for n in ("q", "k", "v", "o")},
                **{f"{n}_bias": W[f"{a}{n}_proj.bias"] for n in ("q", "k", "v")},
                "gate": W[m + "gate_proj.weight"], "up": W[m + "up_proj.weight"], "down": W[m + "down_proj.weight"]}

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache of the model's kv_dtype for `capacity` tokens (default: the model's whole context)."""
        capacity = self.config.max_position_embeddings if capacity is None else capacity
        return KVCache(self.config, capacity, self.kv_dtype)

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run `tokens` after the ones already in `cache`; return logits [T, V] ([1, V] if last_only).

        Row t of the logits is the distribution of the token that follows tokens[t].
        """
        cfg, W, ops = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64)  # [T]
        if tokens.ndim != 1 or len(tokens) == 0:
            raise QwenRefError("forward needs a non-empty 1-D sequence of token ids")
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)]
        if len(bad):
            raise QwenRefError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        cache.reserve(len(tokens))
        past = cache.length
        cos, sin = rope_cos_sin(np.arange(past, past + len(tokens)), self.inv_freq)  # [T, hd/2] each

        x = to_float32(W["model.embed_tokens.weight"][tokens])  # [T, D]
        if len(tokens) == 1 and self.decoder_stack is not None and ops is self.stack_backend:
            x = self.decoder_stack(x, cache.keys, cache.values, past, cos, sin)  # every _decoder_layer below
        else:
            for i in range(cfg.num_hidden_layers):
                x = self._decoder_layer(i, x, cos, sin, cache, past)
        cache.length += len(tokens)

        if last_only:
            x = x[-1:]  # [1, D]: generation needs only the next-token distribution
        x = ops.rms_norm(x, W["model.norm.weight"], cfg.rms_norm_eps)  # result_norm [T, D]
        return ops.linear(x, self.lm_head, None)  # result_output [T, V]

    def _decoder_layer(
        self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache: KVCache, past: int
    ) -> np.ndarray:
        """Qwen2DecoderLayer.forward: x + attention(norm(x)), then + mlp(norm(.)).

        `jitkernels.decode` repeats this layer for one-token steps on the numba backend: change both.
        """
        cfg, W, ops = self.config, self.weights, self.backend
        T, H, Hkv, hd = len(x), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = f"model.layers.{i}."

        h = ops.rms_norm(x, W[p + "input_layernorm.weight"], cfg.rms_norm_eps)  # attn_norm [T, D]
        a = p + "self_attn."
        q, k, v = ops.linears(  # Qcur [T, H*hd], Kcur and Vcur [T, Hkv*hd]: one pass over the three weights
            h,
            (W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"]),
            (W[a + "q_proj.bias"], W[a + "k_proj.bias"], W[a + "v_proj.bias"]),
        )
        q = ops.apply_rope(q.reshape(T, H, hd), cos, sin)  # [T, H, hd]
        k = ops.apply_rope(k.reshape(T, Hkv, hd), cos, sin)  # [T, Hkv, hd]

        end = past + T
        cache.write(i, past, k.transpose(1, 0, 2), v.reshape(T, Hkv, hd).transpose(1, 0, 2))  # [Hkv, T, hd] each
        attn = ops.attention(q, cache.keys[i], cache.values[i], end)  # kqv_out [T, H*hd]
        x = x + ops.linear(attn, W[a + "o_proj.weight"], None)  # ffn_inp [T, D]

        h = ops.rms_norm(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)  # ffn_norm [T, D]
        m = p + "mlp."
        act = ops.swiglu(h, W[m + "gate_proj.weight"], W[m + "up_proj.weight"])  # silu(ffn_gate) * ffn_up [T, F]
        ffn_out = ops.linear(act, W[m + "down_proj.weight"], None)  # ffn_out [T, D]
        return x + ffn_out  # l_out [T, D]


def load_model(model_dir: str | Path, backend: Backend = NUMPY, kv_dtype: str = DEFAULT_KV_DTYPE) -> QwenModel:
    """Read config.json and memory-map the safetensors weights of a checkpoint folder; its caches hold kv_dtype.

    Also tells the C allocator to keep freed memory (`qwen_ref.memory`): the forward pass makes
    its intermediates as new arrays, and glibc would otherwise return them to the OS after each
    layer, for the next layer to fault in again.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QwenRefError(f"model folder {model_dir} does not exist")
    config = load_config(model_dir)
    keep_freed_memory()
    return QwenModel(config, load_weights(model_dir, config), backend, kv_dtype)
