"""Prefill and token-by-token decoding with the KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qwen_ref.errors import QwenRefError
from qwen_ref.kv_cache import KVCache
from qwen_ref.model import ALL_ROWS, LAST_ROW, NO_ROWS, QwenModel
from qwen_ref.sampling import Sampler

# Prompt tokens per forward call (--prefill-chunk): bounds attention scratch at O(chunk x context), not
# O(context^2).
PREFILL_CHUNK = 512


def prefill(
    model: QwenModel,
    tokens: Sequence[int],
    cache: KVCache,
    rows: slice = LAST_ROW,
    chunk: int = PREFILL_CHUNK,
    on_chunk: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Run tokens through the model, `chunk` at a time; return the logits of the positions `rows` selects [n, V].

    `rows` is a contiguous slice of range(len(tokens)) (LAST_ROW: what generation needs; ALL_ROWS: every
    position). Each chunk computes the LM head only for its selected rows. `on_chunk(n)` is called as
    n more tokens are done (for a progress bar). A model set to run layer-major (weights larger than
    memory) takes every chunk through one layer at a time, then each chunk through the LM head.
    """
    if len(tokens) == 0:
        raise QwenRefError("the prompt is empty")
    wanted = range(len(tokens))[rows]
    if wanted.step != 1:
        raise ValueError(f"prefill: rows {rows} must be contiguous")
    hidden = None  # [T, D], the last layer's output, where every layer ran before any logits
    if model.pager is not None:
        hidden = model.decoder_layers_layer_major(tokens, cache, chunk, on_chunk)
    logits = np.empty((len(wanted), model.config.vocab_size), dtype=np.float32)  # [n, V], filled chunk by chunk
    for start in range(0, len(tokens), chunk):
        stop = min(start + chunk, len(tokens))
        first, last = max(wanted.start, start), min(wanted.stop, stop)  # this chunk's selected positions
        selected = slice(first - start, last - start) if first < last else NO_ROWS
        if hidden is None:
            out = model.forward(tokens[start:stop], cache, selected)  # [last - first, V]
            if on_chunk is not None:
                on_chunk(stop - start)
        else:
            out = model.output(hidden[start:stop], selected)  # as forward() ends on this chunk
        if first < last:
            logits[first - wanted.start : last - wanted.start] = out
    return logits


def logits_for_tokens(model: QwenModel, tokens: Sequence[int], rows: slice = ALL_ROWS) -> np.ndarray:
    """The logits [n, V] at the positions `rows` selects (default: every position) of `tokens`, from an empty
    cache: what `qwen-ref logits` writes."""
    check_context(model, len(tokens), 0)
    return prefill(model, tokens, model.new_cache(len(tokens)), rows)


def incremental_logits(model: QwenModel, tokens: Sequence[int]) -> np.ndarray:
    """The logits [T, V] of every position of `tokens`, run one token at a time through the KV cache from an
    empty one, as decoding runs: what `qwen-ref compare --incremental` holds against `logits_for_tokens`."""
    check_context(model, len(tokens), 0)
    cache = model.new_cache(len(tokens))
    logits = np.empty((len(tokens), model.config.vocab_size), dtype=np.float32)  # [T, V]
    for t, token in enumerate(tokens):
        logits[t] = model.forward(np.array([token]), cache, LAST_ROW)[0]  # [V]
    return logits


def check_context(model: QwenModel, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse empty prompts and requests whose positions run past the model's context."""
    context = model.config.max_position_embeddings
    if n_prompt == 0:
        raise QwenRefError("the prompt is empty")
    if n_prompt + max_new_tokens > context:
        asked = f"prompt of {n_prompt} tokens" + (f" + {max_new_tokens} new tokens" if max_new_tokens else "")
        raise QwenRefError(f"{asked} exceeds the model's context of {context} tokens (max_position_embeddings)")


@dataclass
class GenerationStats:
    """What one generate() call did, for the timings printed on stderr."""

    prefill_tokens: int = 0  # prompt tokens actually computed (a reused cache skips the rest)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens generated after the first (each one a forward pass)
    decode_seconds: float = 0.0


def generate(
    model: QwenModel,
    tokens: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    sampler: Sampler,
    cache: KVCache | None = None,
    stats: GenerationStats | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    on_prefill_chunk: Callable[[int], object] | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new tokens after `tokens`; an eos id is yielded, then it stops.

    Matches transformers' `generate()`: the eos token that ends the run is part of the output, and
    the sampler sees the whole history (prompt included) for its repetition penalty. `cache` may
    already hold keys and values of a prefix of `tokens` (earlier chat turns): only the rest is computed.
    """
    check_context(model, len(tokens), max_new_tokens)
    if cache is None:
        cache = model.new_cache(len(tokens) + max_new_tokens)
    stats = stats if stats is not None else GenerationStats()
    # At least the last prompt token is recomputed: its logits give the first new token.
    cache.length = min(cache.length, len(tokens) - 1)
    history = list(tokens)
    stats.prefill_tokens = len(history) - cache.length

    started = time.perf_counter()
    logits = prefill(model, history[cache.length :], cache, LAST_ROW, prefill_chunk, on_prefill_chunk)  # [1, V]
    stats.prefill_seconds = time.perf_counter() - started
    for step in range(max_new_tokens):
        token = sampler(logits[-1], history)
        history.append(token)
        yield token
        if token in eos_token_ids or step == max_new_tokens - 1:
            return
        started = time.perf_counter()
        logits = model.forward(np.array([token]), cache, LAST_ROW)  # [1, V]
        stats.decode_seconds += time.perf_counter() - started
        stats.decode_tokens += 1
