"""The Qwen2ForCausalLM forward pass, written once against the operations of a backend.

Each intermediate is named after llama.cpp's Qwen2 graph (attn_norm, Qcur, Kcur, Vcur, kqv_out,
ffn_inp, ffn_norm, ffn_out, l_out, result_norm) and handed under that name to the model's recorder,
if one is set (`qwen_ref.trace`): `qwen-ref trace` and `--profile` both listen there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from qwen_ref.backends import NUMPY, Backend
from qwen_ref.config import QwenConfig, load_config
from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import DEFAULT_KV_DTYPE, KVCache, check_kv_dtype
from qwen_ref.memory import keep_freed_memory
from qwen_ref.paging import LayerPager, fits_in_memory
from qwen_ref.rope import rope_cos_sin, rope_inv_freq
from qwen_ref.trace import Hook
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
        # operations as _decoder_layer without Python between them (see `fused_decode`)
        self.decoder_stack = None if backend.decoder_stack is None else backend.decoder_stack(
            [self._layer_weights(i) for i in range(config.num_hidden_layers)],
            config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps)
        self.pager: LayerPager | None = None  # set by use_layer_major: prompts then run layer by layer
        self.recorder: Hook | None = None  # given every named intermediate when set (qwen_ref.trace)

    @property
    def fused_decode(self) -> bool:
        """Whether one-token steps run `decoder_stack` instead of `_decoder_layer` layer by layer.

        Only when nothing records the intermediates (the fused kernel has no Python between them to
        hand them out) and the backend still offers a stack: a backend that wraps another's operations
        (rounding or timing them) sets `decoder_stack=None`, so its operations are the ones that run.
        """
        return self.decoder_stack is not None and self.backend.decoder_stack is not None and self.recorder is None

    def _record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        if self.recorder is not None:
            self.recorder.record(name, layer, value)

    def use_layer_major(self, on: bool) -> None:
        """Run prompts layer-major (`decoder_layers_layer_major`), reading each layer ahead as the last one ends."""
        layers = [list(self._layer_weights(i).values()) for i in range(self.config.num_hidden_layers)]
        self.pager = LayerPager(layers) if on else None

    def weight_bytes(self) -> int:
        """Bytes of every weight the forward pass reads, as stored."""
        return sum(w.nbytes for w in self.weights.values())

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

    def forward(self, tokens: np.ndarray, cache: KVCache, rows: slice = ALL_ROWS) -> np.ndarray:
        """Run `tokens` after the ones already in `cache`; return the logits of `rows` [n, V] (all T by default).

        Row t of the logits is the distribution of the token that follows tokens[t]. Only the selected
        rows go through the final norm and the LM head ([T, V] for a long prompt would be far larger
        than the cache). A one-token step runs all layers in one compiled call, `decoder_stack` (the numba
        backend's `jitkernels.decode.DecoderStack`), when `fused_decode` is true. Prompts, and steps on
        the numpy backend, on a backend that wraps the operations or with a recorder set, run
        `_decoder_layer` layer by layer.
        """
        tokens = self._checked(tokens)  # [T]
        cache.reserve(len(tokens))
        past = cache.length
        cos, sin = rope_cos_sin(np.arange(past, past + len(tokens)), self.inv_freq)  # [T, hd/2] each

        x = to_float32(self.weights["model.embed_tokens.weight"][tokens])  # inp_embd [T, D]
        self._record("inp_embd", None, x)
        if len(tokens) == 1 and self.fused_decode:
            x = self.decoder_stack(x, cache.keys, cache.values, past, cos, sin)  # every _decoder_layer below
        else:
            for i in range(self.config.num_hidden_layers):
                x = self._decoder_layer(i, x, cos, sin, cache, past)
        cache.length += len(tokens)
        return self.output(x, rows)

    def decoder_layers_layer_major(
        self, tokens: np.ndarray, cache: KVCache, chunk: int, on_chunk: Callable[[int], object] | None = None,
    ) -> np.ndarray:
        """The last decoder layer's output [T, D] for `tokens`, run as consecutive chunks, layer by layer.

        Every chunk goes through layer i before layer i+1 is touched, so a checkpoint larger than
        memory is read from disk once per prompt instead of once per chunk (`qwen_ref.paging`).
        Each chunk meets the same operations on the same values as in chunk-by-chunk `forward`
        calls, so `output` of each chunk gives the same logits bit for bit (`generation.prefill`).
        `on_chunk(n)` reports n prompt tokens' worth of work done (a chunk through one layer counts
        for 1/L of its tokens).
        """
        tokens = self._checked(tokens)  # [T]
        n_layers = self.config.num_hidden_layers
        cache.reserve(len(tokens))
        past = cache.length
        cos, sin = rope_cos_sin(np.arange(past, past + len(tokens)), self.inv_freq)  # [T, hd/2] each

        x = to_float32(self.weights["model.embed_tokens.weight"][tokens])  # inp_embd [T, D]
        self._record("inp_embd", None, x)
        done = 0  # tokens through one layer, of T * L
        for i in range(n_layers):
            if self.pager is not None:
                self.pager.start(i)
            for s in range(0, len(tokens), chunk):
                e = min(s + chunk, len(tokens))
                x[s:e] = self._decoder_layer(i, x[s:e], cos[s:e], sin[s:e], cache, past + s)  # l_out [e-s, D]
                before, done = done // n_layers, done + e - s
                if on_chunk is not None and done // n_layers > before:
                    on_chunk(done // n_layers - before)
        cache.length += len(tokens)
        return x

    def _checked(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids as int64 [T], refused if empty or outside the vocabulary."""
        tokens = np.asarray(tokens, dtype=np.int64)  # [T]
        if tokens.ndim != 1 or len(tokens) == 0:
            raise QwenRefError("forward needs a non-empty 1-D sequence of token ids")
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if len(bad):
            raise QwenRefError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens

    def output(self, x: np.ndarray, rows: slice = ALL_ROWS) -> np.ndarray:
        """Final RMSNorm and LM head of the rows of x [T, D] that `rows` selects: logits [n, V]."""
        cfg, ops = self.config, self.backend
        wanted = range(len(x))[rows]
        if wanted.step != 1:
            raise ValueError(f"output: rows {rows} must be contiguous")
        if not wanted:
            return np.empty((0, cfg.vocab_size), dtype=np.float32)  # [0, V]
        start = max(0, min(wanted.start, wanted.stop - _LM_HEAD_MIN_ROWS))
        stop = min(len(x), max(wanted.stop, start + _LM_HEAD_MIN_ROWS))
        keep = slice(wanted.start - start, wanted.stop - start)  # the wanted rows among the n'
        x = ops.rms_norm(x[start:stop], self.weights["model.norm.weight"], cfg.rms_norm_eps)  # result_norm [n', D]
        self._record("result_norm", None, x[keep])
        logits = ops.linear(x, self.lm_head, None)[keep]  # result_output [n, V]
        self._record("result_output", None, logits)
        return logits

    def _decoder_layer(
        self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache: KVCache, past: int
    ) -> np.ndarray:
        """Qwen2DecoderLayer.forward: x + attention(norm(x)), then + mlp(norm(.)).

        `jitkernels.decode` repeats this layer for one-token steps on the numba backend: change both.
        """
        cfg, W, ops, record = self.config, self.weights, self.backend, self._record
        T, H, Hkv, hd = len(x), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = f"model.layers.{i}."

        h = ops.rms_norm(x, W[p + "input_layernorm.weight"], cfg.rms_norm_eps)  # attn_norm [T, D]
        record("attn_norm", i, h)
        a = p + "self_attn."
        q, k, v = ops.linears(  # one pass over the three weights
            h,
            (W[a + "q_proj.weight"], W[a + "k_proj.weight"], W[a + "v_proj.weight"]),
            (W[a + "q_proj.bias"], W[a + "k_proj.bias"], W[a + "v_proj.bias"]),
        )
        q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)  # Qcur, Kcur, Vcur
        record("Qcur", i, q)
        record("Kcur", i, k)
        record("Vcur", i, v)
        q = ops.apply_rope(q, cos, sin)  # Qcur_rope [T, H, hd]
        record("Qcur_rope", i, q)
        k = ops.apply_rope(k, cos, sin)  # Kcur_rope [T, Hkv, hd]
        record("Kcur_rope", i, k)

        end = past + T
        cache.write(i, past, k.transpose(1, 0, 2), v.transpose(1, 0, 2))  # [Hkv, T, hd] each
        attn = ops.attention(q, cache.keys[i], cache.values[i], end)  # kqv_out [T, H*hd]
        record("kqv_out", i, attn)
        attn_out = ops.linear(attn, W[a + "o_proj.weight"], None)  # attn_out [T, D]
        record("attn_out", i, attn_out)
        x = x + attn_out  # ffn_inp [T, D]
        record("ffn_inp", i, x)

        h = ops.rms_norm(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)  # ffn_norm [T, D]
        record("ffn_norm", i, h)
        m = p + "mlp."
        if self.recorder is not None:  # swiglu fuses gate_proj and up_proj: made again here, for the record only
            for name, weight in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj")):
                if self.recorder.wants(name, i):
                    record(name, i, ops.linear(h, W[f"{m}{weight}.weight"], None))  # [T, F]
        act = ops.swiglu(h, W[m + "gate_proj.weight"], W[m + "up_proj.weight"])  # ffn_act [T, F]
        record("ffn_act", i, act)
        ffn_out = ops.linear(act, W[m + "down_proj.weight"], None)  # ffn_out [T, D]
        record("ffn_out", i, ffn_out)
        x = x + ffn_out  # l_out [T, D]
        record("l_out", i, x)
        return x


def load_model(
    model_dir: str | Path, backend: Backend = NUMPY, kv_dtype: str = DEFAULT_KV_DTYPE, layer_major: bool | None = None
) -> QwenModel:
    """Read config.json and memory-map the safetensors weights of a checkpoint folder; its caches hold kv_dtype.

    Prompts run layer-major when `layer_major` says so, or by default (None) when the weights do
    not fit in the memory available (`qwen_ref.paging`). Also tells the C allocator to keep freed
    memory (`qwen_ref.memory`): the forward pass makes its intermediates as new arrays, and glibc
    would otherwise return them to the OS after each layer, for the next layer to fault in again.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QwenRefError(f"model folder {model_dir} does not exist")
    config = load_config(model_dir)
    keep_freed_memory()
    model = QwenModel(config, load_weights(model_dir, config), backend, kv_dtype)
    model.use_layer_major(not fits_in_memory(model.weight_bytes()) if layer_major is None else layer_major)
    return model
