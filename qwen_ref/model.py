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
from qwen_ref.kv_cache import KVCache
from qwen_ref.memory import keep_freed_memory
from qwen_ref.rope import rope_cos_sin, rope_inv_freq
from qwen_ref.weights import load_weights, to_float32

# Which rows of a forward call get logits: a slice of range(T), step 1, negative ends counted from T.
ALL_ROWS = slice(None)
LAST_ROW = slice(-1, None)  # the next-token distribution: all that generation needs
NO_ROWS = slice(0, 0)  # keys and values only: the LM head does not run
# OpenBLAS (0.3.31, Haswell kernels) and the numba matmul (its GEMV, up to 3 rows) sum a row of
# x @ W.T in another order in calls of up to 4 rows than in larger calls. A selection of fewer rows
# therefore runs the LM head with neighbouring rows up to this many (then drops them), so that
# selected logits equal the same rows of the full logits bit for bit.
_LM_HEAD_MIN_ROWS = 8


class QwenModel:
    """Qwen2ForCausalLM: embeddings, L decoder layers, final RMSNorm, LM head."""

    def __init__(self, config: QwenConfig, weights: dict[str, np.ndarray], backend: Backend = NUMPY):
        self.config = config
        self.weights = weights
        self.backend = backend
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
        """An empty KV cache for `capacity` tokens (default: the model's whole context)."""
        return KVCache(self.config, self.config.max_position_embeddings if capacity is None else capacity)

    def forward(self, tokens: np.ndarray, cache: KVCache, rows: slice = ALL_ROWS) -> np.ndarray:
        """Run `tokens` after the ones already in `cache`; return the logits of `rows` [n, V] (all T by default).

        Row t of the logits is the distribution of the token that follows tokens[t]. Only the selected
        rows go through the final norm and the LM head ([T, V] for a long prompt would be far larger
        than the cache).
        """
        cfg, W, ops = self.config, self.weights, self.backend
        tokens = np.asarray(tokens, dtype=np.int64)  # [T]
        if tokens.ndim != 1 or len(tokens) == 0:
            raise QwenRefError("forward needs a non-empty 1-D sequence of token ids")
        bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)]
        if len(bad):
            raise QwenRefError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        wanted = range(len(tokens))[rows]
        if wanted.step != 1:
            raise ValueError(f"forward: rows {rows} must be contiguous")
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

        if not wanted:
            return np.empty((0, cfg.vocab_size), dtype=np.float32)  # [0, V]
        start = max(0, min(wanted.start, wanted.stop - _LM_HEAD_MIN_ROWS))
        stop = min(len(tokens), max(wanted.stop, start + _LM_HEAD_MIN_ROWS))
        x = ops.rms_norm(x[start:stop], W["model.norm.weight"], cfg.rms_norm_eps)  # result_norm [n', D]
        logits = ops.linear(x, self.lm_head, None)  # result_output [n', V]
        return logits[wanted.start - start : wanted.stop - start]  # [n, V]

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
        cache.keys[i, :, past:end] = k.transpose(1, 0, 2)  # [Hkv, T, hd]
        cache.values[i, :, past:end] = v.reshape(T, Hkv, hd).transpose(1, 0, 2)  # [Hkv, T, hd]
        attn = ops.attention(q, cache.keys[i], cache.values[i], end)  # kqv_out [T, H*hd]
        x = x + ops.linear(attn, W[a + "o_proj.weight"], None)  # ffn_inp [T, D]

        h = ops.rms_norm(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)  # ffn_norm [T, D]
        m = p + "mlp."
        act = ops.swiglu(h, W[m + "gate_proj.weight"], W[m + "up_proj.weight"])  # silu(ffn_gate) * ffn_up [T, F]
        ffn_out = ops.linear(act, W[m + "down_proj.weight"], None)  # ffn_out [T, D]
        return x + ffn_out  # l_out [T, D]


def load_model(model_dir: str | Path, backend: Backend = NUMPY) -> QwenModel:
    """Read config.json and memory-map the safetensors weights of a checkpoint folder.

    Also tells the C allocator to keep freed memory (`qwen_ref.memory`): the forward pass makes
    its intermediates as new arrays, and glibc would otherwise return them to the OS after each
    layer, for the next layer to fault in again.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QwenRefError(f"model folder {model_dir} does not exist")
    config = load_config(model_dir)
    keep_freed_memory()
    return QwenModel(config, load_weights(model_dir, config), backend)
