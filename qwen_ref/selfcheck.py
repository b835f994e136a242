"""`qwen-ref selfcheck`: run the tiny checkpoint shipped in the package against its transformers logits."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import numpy as np

from qwen_ref.backends import Backend
from qwen_ref.compare import compare_logits
from qwen_ref.config import load_generation_config
from qwen_ref.generation import generate, prefill
from qwen_ref.model import ALL_ROWS, load_model
from qwen_ref.sampling import GREEDY, Sampler

SELFCHECK_MODEL = Path(str(files("qwen_ref") / "selfcheck_model"))


def run_selfcheck(backend: Backend, layer_major: bool | None = None) -> bool:
    """Compare logits and greedy tokens with the stored reference; print the verdict on stdout."""
    model = load_model(SELFCHECK_MODEL, backend, layer_major=layer_major)
    reference = np.load(SELFCHECK_MODEL / "reference.npz")
    prompt = reference["prompt_tokens"]
    logits = prefill(model, prompt, model.new_cache(len(prompt)), ALL_ROWS)  # [T, V]
    report = compare_logits(reference["logits"], logits)

    eos = load_generation_config(SELFCHECK_MODEL, model.config).eos_token_ids
    expected = [int(t) for t in reference["greedy_tokens"]]
    greedy = list(generate(model, [int(t) for t in prompt], len(expected), eos, Sampler(GREEDY)))
    greedy_ok = greedy == expected

    cfg = model.config
    print(
        f"selfcheck model: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
        f"{cfg.num_key_value_heads} kv heads, vocab {cfg.vocab_size}; backend {backend.name}; "
        f"reference: transformers {reference['transformers_version']} float32"
    )
    print(f"logits: {report.summary()}: {'ok' if report.ok else 'MISMATCH'}")
    print(f"greedy: {len(expected)} tokens {'identical' if greedy_ok else 'DIFFER'}")
    ok = report.ok and greedy_ok
    print("selfcheck passed" if ok else "selfcheck FAILED")
    sys.stdout.flush()
    return ok
