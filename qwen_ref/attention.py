"""Causal grouped-query attention: the NumPy specification of the attention kernels."""

import numpy as np

from qwen_ref.weights import to_float32


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, S: int) -> np.ndarray:
    """softmax(q k^T / sqrt(hd) + causal mask) v, heads grouped over shared keys (eager_attention_forward).

    q: [T, H, hd], the queries of the T newest tokens; keys, values: [Hkv, capacity, hd], a layer of
    the KV cache whose first S positions hold the keys and values of all S tokens so far, the newest
    T last, in the cache dtype (float32, bfloat16 words or float16), widened exactly here. Query
    head h reads kv head h // G, as `repeat_kv` arranges, without K and V being repeated in memory.
    Returns [T, H * hd], ready for o_proj.
    """
    T, H, hd = q.shape
    if not T <= S <= keys.shape[1]:
        raise ValueError(f"attention: {T} queries over S = {S} positions of a cache of {keys.shape[1]}")
    k, v = to_float32(keys[:, :S]), to_float32(values[:, :S])  # [Hkv, S, hd] each
    Hkv = k.shape[0]
    G = H // Hkv
    past = S - T  # query t sits at position past + t
    q_grouped = q.transpose(1, 0, 2).reshape(Hkv, G * T, hd)  # [Hkv, G*T, hd]: row g*T + t
    scores = (q_grouped @ k.transpose(0, 2, 1)) * (hd**-0.5)  # [Hkv, G*T, S]
    scores = scores.reshape(Hkv, G, T, S)  # [Hkv, G, T, S]
    future = np.arange(S)[None, :] > past + np.arange(T)[:, None]  # [T, S]: keys a query may not see
    scores[..., future] = -np.inf
    # softmax in float32, as transformers does (softmax(..., dtype=torch.float32))
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # [Hkv, G, T, S]
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(Hkv, G * T, S) @ v  # [Hkv, G*T, hd]
    return out.reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)  # [T, H*hd], head h = kv*G + g
