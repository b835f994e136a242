"""Measure what the trace diff's threshold (qwen_ref.trace_diff.DEFAULT_MAX_NMSE) must separate.

    python tools/trace_nmse_floor.py

Below it: the NMSE between correct implementations whose float32 sums run in different orders, the
numpy and the numba backend, and transformers where it is installed (the noise floor, the max over
every tensor of a trace; transformers' intermediates are caught by tools/trace_transformers.py's
hooks). Above
it: one operation broken in one layer (`BREAKAGES`), the culprit's NMSE. The models are random
but Qwen-like in scale (`qwen_like_weights`): the subtlest breakage, RMSNorm eps 1e-6 -> 1e-5, shows
only where activations are small, as Qwen's are (embeddings of std ~0.02). tests/test_trace_diff.py
uses the same weights and breakages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref and jitkernels, whatever is installed

from qwen_ref.backends import get_backend
from qwen_ref.config import QwenConfig
from qwen_ref.linear import linear
from qwen_ref.mlp import silu_mul
from qwen_ref.model import QwenModel
from qwen_ref.trace import Recorder, Trace
from qwen_ref.trace_diff import DEFAULT_MAX_NMSE, diff_traces
from qwen_ref.weights import expected_shapes

BROKEN_LAYER = 1


def qwen_like_weights(config: QwenConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 random weights whose activations are of Qwen's scale.

    Embeddings ~ N(0, 0.02^2) (Qwen1.5's are of that size); q/k/v/gate/up and the LM head ~ N(0, 1/in),
    so that a projection of a normalised vector is of unit scale; o_proj and down_proj write 0.02 rms into
    the residual stream, which therefore stays small through the layers, as in Qwen's first layers.
    Norm weights near 1, biases 0.3 rms.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.2 * noise
        elif name.endswith(".bias"):
            weights[name] = 0.3 * noise
        elif name == "model.embed_tokens.weight":
            weights[name] = 0.02 * noise
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = noise * np.float32(0.02 / math.sqrt(shape[1]))
        else:
            weights[name] = noise * np.float32(1 / math.sqrt(shape[1]))
    return weights


def record(model: QwenModel, tokens: list[int]) -> Trace:
    """The trace of one forward pass over `tokens`, with the metadata `qwen-ref trace` writes."""
    model.recorder = Recorder()
    model.forward(np.array(tokens), model.new_cache(len(tokens)))
    tensors, model.recorder = model.recorder.tensors(), None
    return Trace(tensors, {"backend": model.backend.name, "tokens": json.dumps(tokens)})


def transformers_trace(config: dict, weights: dict[str, np.ndarray], tokens: list[int]) -> Trace:
    """The same forward pass in transformers' Qwen2ForCausalLM (eager attention, float32), hooked as
    tools/trace_transformers.py hooks it."""
    import torch
    import transformers
    from trace_transformers import record_transformers

    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config))
    model.set_attn_implementation("eager")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    recorder = Recorder()
    metadata = record_transformers(model.eval(), tokens, recorder)
    return Trace(recorder.tensors(), metadata)


# ---------------------------------------------------------------------------------------------------
# Broken operations, each the correct one with a single mistake


def rope_neighbours(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE rotating pairs (2j, 2j+1), as llama2.c does, instead of Qwen's (j, j + hd/2)."""
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, hd/2]
    even, odd = x[..., 0::2], x[..., 1::2]  # [T, n, hd/2] each
    out = np.empty_like(x)  # [T, n, hd]
    out[..., 0::2], out[..., 1::2] = even * c - odd * s, odd * c + even * s
    return out


def attention_round_robin(q: np.ndarray, keys: np.ndarray, values: np.ndarray, S: int) -> np.ndarray:
    """Causal attention where query head h reads kv head h % Hkv instead of h // G."""
    T, H, hd = q.shape
    Hkv = keys.shape[0]
    future = np.arange(S)[None, :] > (S - T) + np.arange(T)[:, None]  # [T, S]
    out = np.empty((T, H, hd), dtype=np.float32)
    for h in range(H):
        k, v = keys[h % Hkv, :S].astype(np.float32), values[h % Hkv, :S].astype(np.float32)  # [S, hd] each
        scores = np.where(future, -np.inf, q[:, h] @ k.T * np.float32(hd**-0.5))  # [T, S]
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))  # [T, S]
        out[:, h] = (w / w.sum(axis=-1, keepdims=True)) @ v  # [T, hd]
    return out.reshape(T, H * hd)


def swiglu_swapped(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    """silu(up) * gate instead of silu(gate) * up."""
    return silu_mul(linear(x, w_up), linear(x, w_gate))  # [T, F]


def _with_ops(model: QwenModel, method: str, only_layer: int | None, **ops: Callable) -> None:
    """Make `model.<method>` (_decoder_layer, or output) run with some backend operations replaced,
    in layer `only_layer` only (every call of `output`)."""
    correct = getattr(model, method)

    def broken(*args, **kwargs):
        if only_layer is not None and args[0] != only_layer:
            return correct(*args, **kwargs)
        backend = model.backend
        model.backend = dataclasses.replace(backend, decoder_stack=None, **ops)
        try:
            return correct(*args, **kwargs)
        finally:
            model.backend = backend

    setattr(model, method, broken)


def _drop_k_bias(model: QwenModel) -> None:
    key = f"model.layers.{BROKEN_LAYER}.self_attn.k_proj.bias"
    model.weights = model.weights | {key: np.zeros_like(model.weights[key])}


def _norm_eps_x10(model: QwenModel) -> None:
    correct = model.backend.rms_norm
    _with_ops(model, "_decoder_layer", BROKEN_LAYER, rms_norm=lambda x, w, eps: correct(x, w, 10 * eps))


# name: (how to break a numpy-backend model in place, the culprit the diff must name)
BREAKAGES: dict[str, tuple[Callable[[QwenModel], None], str]] = {
    "RoPE pairs neighbours": (
        lambda m: _with_ops(m, "_decoder_layer", BROKEN_LAYER, apply_rope=rope_neighbours), "blk.1.Qcur_rope"),
    "k bias dropped": (_drop_k_bias, "blk.1.Kcur"),
    "RMSNorm eps x10": (_norm_eps_x10, "blk.1.attn_norm"),
    "GQA heads round-robin": (
        lambda m: _with_ops(m, "_decoder_layer", BROKEN_LAYER, attention=attention_round_robin), "blk.1.kqv_out"),
    "SwiGLU gate and up swapped": (
        lambda m: _with_ops(m, "_decoder_layer", BROKEN_LAYER, swiglu=swiglu_swapped), "blk.1.ffn_act"),
    "final norm skipped": (lambda m: _with_ops(m, "output", None, rms_norm=lambda x, w, eps: x.copy()),
                           "result_norm"),
}


def main() -> None:
    shapes = {
        "D32 L3 GQA 4/2 hd8": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97},
        "D256 L6 GQA 4/2 hd64": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    }
    try:
        import transformers  # noqa: F401
        others = ("numba", "transformers")
    except ImportError:
        others = ("numba",)
    print(f"default --max-nmse {DEFAULT_MAX_NMSE:.0e}")
    for label, shape in shapes.items():
        settings = {"max_position_embeddings": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False, **shape}
        config = QwenConfig.from_dict({"model_type": "qwen2", **settings})
        weights = qwen_like_weights(config)
        for T in (16, 32):
            tokens = [int(t) for t in np.random.default_rng(T).integers(0, config.vocab_size, T)]
            ref = record(QwenModel(config, weights, get_backend("numpy")), tokens)
            for other in others:
                trace = (transformers_trace(settings, weights, tokens) if other == "transformers"
                         else record(QwenModel(config, weights, get_backend(other)), tokens))
                noise = diff_traces(ref, trace)
                worst = max(noise.tensors.values(), key=lambda d: d.nmse)
                print(f"{label}, T={T}: numpy vs {other}, max NMSE {worst.nmse:.2e} ({worst.key}) over "
                      f"{len(noise.tensors)} tensors")
            for name, (brk, expected) in BREAKAGES.items():
                model = QwenModel(config, weights, get_backend("numpy"))
                brk(model)
                broken = diff_traces(ref, record(model, tokens))
                if broken.culprit is None:
                    print(f"    {name:<28} no culprit (want {expected})")
                    continue
                key = broken.culprit.key
                print(f"    {name:<28} culprit {key} (want {expected}), NMSE {broken.tensors[key].nmse:.2e}")


if __name__ == "__main__":
    main()
