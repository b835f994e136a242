"""Causal grouped-query attention: the NumPy specification of the attention kernels."""

import numpy as np

from qwen_ref.weights import to_float32


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, S: int) -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v, heads grouped over shared keys (eager_attention_forward).

    q: [T, H, hd], the queries of the T newest tokens; keys, values: [Hkv, capacity, hd], a layer of
    the KV cache whose first S positions hold the keys and values of all S tokens so far, the newest
    T last, in the cache dtype (float32, bfloat16 words or float16), widened exactly here. Query
    head j * G + g reads kv head j, as transformers' `repeat_kv` arranges. Returns [T, H * hd], ready
    for o_proj. Twin of `jitkernels.attention`, whose query rows are in the same order.
    """
    T, H, hd = q.shape
    if not T <= S <= keys.shape[1]:
        raise ValueError(f"attention: {T} queries over S = {S} positions of a cache of {keys.shape[1]}")
    k, v = to_float32(keys[:, :S]), to_float32(values[:, :S])  # [Hkv, S, hd] each
    Hkv = k.shape[0]
    G = H // Hkv  # query heads per kv head
    past = S - T  # query t sits at position past + t
    # repeat_kv without the copy: rather than repeat each kv head G times, stack the T * G queries
    # that read kv head j into one matrix, position-major (row t * G + g is head j * G + g at t).
    q_grouped = q.reshape(T, Hkv, G, hd).transpose(1, 0, 2, 3).reshape(Hkv, T * G, hd)  # [Hkv, T*G, hd]
    scores = (q_grouped @ k.transpose(0, 2, 1)) * (hd**-0.5)  # [Hkv, T*G, S]
    scores = scores.reshape(Hkv, T, G, S)  # [Hkv, T, G, S]
    future = np.arange(S)[None, :] > past + np.arange(T)[:, None]  # [T, S]: keys a query may not see
    np.copyto(scores, -np.inf, where=future[:, None, :])  # every head of position t alike
    # softmax in float32, as transformers does (softmax(..., dtype=torch.float32))
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # [Hkv, T, G, S]
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(Hkv, T * G, S) @ v  # [Hkv, T*G, hd]
    return out.reshape(Hkv, T, G, hd).transpose(1, 0, 2, 3).reshape(T, H * hd)  # [T, H*hd], head j*G + g
