"""Choosing the next token from logits: greedy, or sampling as transformers' logits processors do.

The order and the arithmetic follow `GenerationMixin._get_logits_processor`: repetition penalty
(also in greedy decoding), then temperature, top-k, top-p and min-p, then a draw from the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwen_ref.config import GenerationConfig
from qwen_ref.errors import QwenRefError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy: argmax after the repetition penalty
    top_k: int = 50  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1 changes nothing

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise QwenRefError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QwenRefError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QwenRefError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise QwenRefError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise QwenRefError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_generation_config(cls, gen: GenerationConfig) -> SamplingParams:
        """What `model.generate()` would use: the checkpoint's settings, greedy unless do_sample."""
        return cls(
            temperature=gen.temperature if gen.do_sample else 0.0,
            top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p, repetition_penalty=gen.repetition_penalty,
        )


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Make every token seen so far (prompt included) less likely (RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    seen = seen[seen < len(logits)]
    logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def warp(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p filters (removed tokens become -inf); logits: [V] float32."""
    scores = logits / np.float32(params.temperature) if params.temperature != 1.0 else logits.copy()  # [V]
    if params.top_k and params.top_k < len(scores):  # TopKLogitsWarper: ties with the k-th score stay
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores[scores < kth] = -np.inf
    if params.top_p < 1.0:  # TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep the top one
        order = np.argsort(scores, kind="stable")  # ascending
        # float32 probabilities summed in float64 and rounded, as torch's cumsum does on CPU
        tail_mass = np.cumsum(_softmax(scores[order]), dtype=np.float64).astype(np.float32)
        drop = tail_mass <= 1 - params.top_p
        drop[-1] = False
        scores[order[drop]] = -np.inf
    if params.min_p is not None:  # MinPLogitsWarper: drop tokens below min_p x the top probability
        probs = _softmax(scores)
        drop = probs < params.min_p * probs.max()
        drop[np.argmax(probs)] = False
        scores[drop] = -np.inf
    return scores


def next_token_distribution(logits: np.ndarray, history: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The probabilities [V] the next token is drawn from (one-hot at the argmax when greedy)."""
    scores = apply_repetition_penalty(logits.astype(np.float32), history, params.repetition_penalty)
    if params.temperature == 0:
        probs = np.zeros(len(scores))
        probs[np.argmax(scores)] = 1.0
        return probs
    return _softmax(warp(scores, params))  # float32, as torch.softmax: what underflows there is 0 here too


class Sampler:
    """Picks tokens; the same seed and settings give the same tokens."""

    def __init__(self, params: SamplingParams, seed: int | None = None):
        self.params = params
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        probs = next_token_distribution(logits, history, self.params)  # [V]
        if self.params.temperature == 0:
            return int(np.argmax(probs))
        cdf = np.cumsum(probs, dtype=np.float64)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1))


GREEDY = SamplingParams(temperature=0.0)  # plain argmax, no repetition penalty
