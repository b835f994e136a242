"""Prefill and token-by-token decoding with the KV cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import KVCache
from qwen_ref.model import QwenModel

# Prompt tokens per forward call: bounds attention scratch at O(chunk x context), not O(context^2).
PREFILL_CHUNK = 512


def prefill(model: QwenModel, tokens: Sequence[int], cache: KVCache, last_only: bool = True) -> np.ndarray:
    """Run a prompt through the model in chunks; logits of every position, or [1, V] of the last."""
    chunks = [tokens[i : i + PREFILL_CHUNK] for i in range(0, len(tokens), PREFILL_CHUNK)]
    if last_only:
        for chunk in chunks[:-1]:
            model.forward(chunk, cache, last_only=True)
        return model.forward(chunks[-1], cache, last_only=True)  # [1, V]
    return np.concatenate([model.forward(chunk, cache) for chunk in chunks])  # [T, V]


def check_context(model: QwenModel, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse empty prompts and requests that run past the model's context."""
    context = model.config.max_position_embeddings
    if n_prompt == 0:
        raise QwenRefError("the prompt is empty")
    if n_prompt + max_new_tokens > context:
        raise QwenRefError(
            f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's context of {context}"
        )


def generate_greedy(
    model: QwenModel, prompt: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]
) -> Iterator[int]:
    """Yield up to `max_new_tokens` argmax tokens; an eos id is yielded, then generation stops.

    Matches transformers' `generate(do_sample=False)`: the eos token that ends the run is part of
    the output, and argmax ties go to the lowest id.
    """
    check_context(model, len(prompt), max_new_tokens)
    cache = model.new_cache(len(prompt) + max_new_tokens)
    logits = prefill(model, prompt, cache)  # [1, V]
    for step in range(max_new_tokens):
        token = int(np.argmax(logits[-1]))
        yield token
        if token in eos_token_ids or step == max_new_tokens - 1:
            return
        logits = model.forward(np.array([token]), cache, last_only=True)  # [1, V]
