"""The decoder layers of one decode step (one new token) in a single compiled call.

A decode step of Qwen1.5-0.5B runs about 200 kernels: per layer two RMSNorms, the q/k/v GEMV, two
RoPEs, attention, o_proj, the SwiGLU GEMV and down_proj. Called one by one from Python, each pays
its wrapper (checks, weight views, new output arrays) and Numba's dispatch while memory idles
(benchmarks/KERNELS.md, DecoderStack). `DecoderStack` puts every layer's weights in the kernels'
form once and runs the layers in one call, on the same kernels in the same order as the backend
operations run them for one token, so the result is the same bit for bit (tests/test_decode.py).

This is the one module of the package that composes kernels into a model layer: the pre-norm layer
Qwen2 shares with Llama (RMSNorm, q/k/v with optional biases, rotate_half RoPE, GQA, SwiGLU), by
weight role, never by checkpoint name or config. It stays here because it is compiled from the
kernels' inner functions, so it shares their cache key and lock (`cache.py`). `_layers` repeats
`qwen_ref.model.QwenModel._decoder_layer`: change both together.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

# The jitted functions behind the backend operations, called as the operations call them for one row
from jitkernels.attention import _attend, _merge, key_splits
from jitkernels.cache import CACHE
from jitkernels.matmul import _gemv, _gemv_swiglu, _kernel_bias, gemv_weight
from jitkernels.narrow import narrow
from jitkernels.norm import _rms_norm_rows
from jitkernels.rope import _apply_rope_rows
from jitkernels.widen import as_kernel_dtype, kernel_words


class DecoderStack:
    """Every decoder layer for one new token, in one call; op by op: `qwen_ref.model.QwenModel._decoder_layer`.

    layers[i] holds layer i's weights in their stored dtype under the names attn_norm, q, k, v,
    q_bias, k_bias, v_bias (None if absent), o, ffn_norm, gate, up, down; matrices are [n_out, n_in].
    """

    def __init__(self, layers: list[dict[str, np.ndarray | None]], n_heads: int, n_kv_heads: int, eps: float) -> None:
        def norms(name: str) -> tuple:
            return tuple(as_kernel_dtype(layer[name]) for layer in layers)  # [D] each

        def matrices(name: str) -> tuple:
            # as `jitkernels.linear` hands them to _gemv: views of the weights (a pair view is never
            # unaligned in a padded safetensors file, so nothing is copied)
            return tuple(gemv_weight(as_kernel_dtype(layer[name])) for layer in layers)  # [n_out, n_in] each

        def biases(name: str, ws: tuple) -> tuple:
            return tuple(_kernel_bias(layer[name], w) for layer, w in zip(layers, ws))  # [n_out] or [0]

        self.attn_norm, self.ffn_norm = norms("attn_norm"), norms("ffn_norm")
        self.q, self.k, self.v, self.o = matrices("q"), matrices("k"), matrices("v"), matrices("o")
        self.gate, self.up, self.down = matrices("gate"), matrices("up"), matrices("down")
        self.q_bias, self.k_bias = biases("q_bias", self.q), biases("k_bias", self.k)
        self.v_bias = biases("v_bias", self.v)
        self.no_bias = tuple(_kernel_bias(None, w) for w in self.o)  # o_proj and down_proj have none
        self.n_heads, self.n_kv_heads, self.eps = n_heads, n_kv_heads, np.float32(eps)

    def __call__(self, x: np.ndarray, keys: np.ndarray, values: np.ndarray, past: int, cos: np.ndarray,
                 sin: np.ndarray) -> np.ndarray:
        """x [1, D] float32 after the embedding -> x after the last layer, a new [1, D] array.

        keys, values: [L, Hkv, capacity, hd], the cache, whose first `past` positions are filled; this
        token's are written at position `past`, rounded to the cache's dtype (float32, bfloat16 words as
        uint16, or float16; see `jitkernels.narrow`). cos, sin: [1, hd/2] float32 of that position.
        """
        L, D, half = len(self.q), self.attn_norm[0].shape[0], keys.shape[-1] // 2
        if (x.shape != (1, D) or keys.shape != values.shape or keys.shape[:2] != (L, self.n_kv_heads)
                or not 0 <= past < keys.shape[2] or cos.shape != (1, half) or sin.shape != (1, half)):
            raise ValueError(f"decoder stack: x {x.shape}, cache {keys.shape} {values.shape}, past {past}, "
                             f"cos {cos.shape}, sin {sin.shape} do not fit {L} layers of width {D}")
        # the types the operations would pass (their wrappers copy anything else into these)
        if keys.dtype != values.dtype or not (keys.flags.c_contiguous and values.flags.c_contiguous):
            raise ValueError(f"decoder stack: the cache must be C-contiguous keys and values of one dtype, not "
                             f"{keys.dtype}, {values.dtype}")
        keys, values = kernel_words(keys, "decoder stack: the cache"), kernel_words(values, "decoder stack: the cache")
        cos, sin = np.ascontiguousarray(cos, dtype=np.float32), np.ascontiguousarray(sin, dtype=np.float32)
        n_threads = numba.get_num_threads()
        n_splits = key_splits(1, self.n_heads, self.n_kv_heads, past + 1, n_threads)
        return _layers(np.ascontiguousarray(x, dtype=np.float32), self.attn_norm, self.q, self.k, self.v,
                       self.q_bias, self.k_bias, self.v_bias, self.o, self.no_bias, self.ffn_norm, self.gate, self.up,
                       self.down, keys, values, past, cos, sin, self.eps, self.n_heads, n_splits, n_threads)


@njit(cache=CACHE)
def _layers(x, attn_norm, wq, wk, wv, bq, bk, bv, wo, no_bias, ffn_norm, w_gate, w_up, w_down, keys, values, past,
            cos, sin, eps, H, n_splits, n_threads):
    """x after L pre-norm decoder layers, for one token; a new [1, D] float32 array (l_out of the last).

    Weights are tuples of L arrays, one per layer, in kernel words (float32; bfloat16 as uint16, or
    as uint32 pairs where `gemv_weight` pairs a matrix's rows; float16 as int16), read only:
      attn_norm, ffn_norm [D]; wq [H*hd, D]; wk, wv [Hkv*hd, D]; wo [D, H*hd];
      w_gate, w_up [F, D]; w_down [D, F]; bq [H*hd], bk, bv [Hkv*hd], or [0] for no bias;
      no_bias [0], the empty bias of o_proj and down_proj. (Pairs halve the last dimension.)
    x: [1, D] float32, the token's embedding. keys, values: [L, Hkv, capacity, hd] cache words of one
    dtype; the first `past` positions are read, position `past` is written. cos, sin: [1, hd/2]
    float32 of that position. eps: float32 of the RMSNorms. H: query heads (Hkv and hd come from the
    cache). n_splits: key ranges per attention item (`key_splits` for S = past + 1); n_threads:
    `numba.get_num_threads()`, passed in because a kernel that asks for it could not be cached.
    """
    Hkv, hd = keys.shape[1], keys.shape[3]
    S = past + 1
    h = np.empty_like(x)  # [1, D]
    for i in range(len(wq)):
        _rms_norm_rows(x, attn_norm[i], eps, h, 0, 1)  # attn_norm
        q = np.empty((1, wq[i].shape[0]), dtype=np.float32)  # Qcur [1, H*hd]
        k = np.empty((1, wk[i].shape[0]), dtype=np.float32)  # Kcur [1, Hkv*hd]
        v = np.empty((1, wv[i].shape[0]), dtype=np.float32)  # Vcur [1, Hkv*hd]
        _gemv(h, (wq[i], wk[i], wv[i]), (bq[i], bk[i], bv[i]), (q, k, v))
        q_rot = np.empty((1, H, hd), dtype=np.float32)  # [1, H, hd]
        k_rot = np.empty((1, Hkv, hd), dtype=np.float32)  # [1, Hkv, hd]
        _apply_rope_rows(q.reshape(1, H, hd), cos, sin, q_rot, 0, 1)
        _apply_rope_rows(k.reshape(1, Hkv, hd), cos, sin, k_rot, 0, 1)
        v_heads = v.reshape(1, Hkv, hd)
        for j in range(Hkv):
            for d in range(hd):
                keys[i, j, past, d] = narrow(k_rot[0, j, d], keys.dtype)
                values[i, j, past, d] = narrow(v_heads[0, j, d], values.dtype)
        m = np.empty((n_splits, 1, H), dtype=np.float32)  # [splits, 1, H] running max of scores
        l = np.empty((n_splits, 1, H), dtype=np.float32)  # [splits, 1, H] running sum of e^(s - m)
        acc = np.empty((n_splits, 1, H, hd), dtype=np.float32)  # [splits, 1, H, hd] running sum of e^(s - m) v
        _attend(q_rot, keys[i], values[i], S, m, l, acc, n_threads)
        attn = np.empty((1, H * hd), dtype=np.float32)  # kqv_out [1, H*hd]
        _merge(m, l, acc, attn)
        o = np.empty_like(x)  # [1, D]
        _gemv(attn, (wo[i],), (no_bias[i],), (o,))
        x = x + o  # ffn_inp
        _rms_norm_rows(x, ffn_norm[i], eps, h, 0, 1)  # ffn_norm
        act = np.empty((1, w_gate[i].shape[0]), dtype=np.float32)  # silu(ffn_gate) * ffn_up [1, F]
        _gemv_swiglu(h, w_gate[i], w_up[i], act)
        ffn_out = np.empty_like(x)  # [1, D]
        _gemv(act, (w_down[i],), (no_bias[i],), (ffn_out,))
        x = x + ffn_out  # l_out
    return x
