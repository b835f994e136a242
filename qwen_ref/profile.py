"""`--profile`: where a run's time goes, by operation class, printed on stderr afterwards.

The backend's operations are wrapped with timers; matrix products are named after the weight they
read (q_proj, gate_proj, lm_head ...), so a reader sees which tensor costs what. Nothing is timed
unless --profile asks for it.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from qwen_ref.backends import Backend


class Profile:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def timed(self, name: str, fn: Callable) -> Callable:
        """`fn`, adding its wall time to `name`."""

        def run(*args):
            started = time.perf_counter()
            out = fn(*args)
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1
            return out

        return run

    def report(self, tokens: int) -> str:
        """A table, slowest first: total ms, share, ms per token over `tokens` tokens."""
        total = sum(self.seconds.values()) or 1.0
        lines = [f"{'operation':<18} {'calls':>7} {'total ms':>10} {'share':>7} {'ms/token':>9}"]
        for name, seconds in sorted(self.seconds.items(), key=lambda item: -item[1]):
            lines.append(
                f"{name:<18} {self.calls[name]:>7} {seconds * 1e3:>10.1f} {seconds / total:>7.1%} "
                f"{seconds * 1e3 / max(tokens, 1):>9.3f}"
            )
        return "\n".join(lines)


def _matmul_name(weight_name: str, tied: bool) -> str:
    if weight_name == "lm_head.weight" or (tied and weight_name == "model.embed_tokens.weight"):
        return "lm_head"
    match = re.search(r"\.(\w+_proj)\.weight$", weight_name)
    return match.group(1) if match else "other"


def profiled_backend(backend: Backend, weights: dict[str, np.ndarray], tied: bool, profile: Profile) -> Backend:
    """`backend` with every operation timed into `profile`. A model given it runs a decode step's
    operations one by one, each timed, not in one call (`jitkernels.decode`): ~8% slower."""
    names = {id(w): _matmul_name(name, tied) for name, w in weights.items()}

    def matmuls(*ws: np.ndarray) -> str:
        return "matmul " + "+".join(names.get(id(w), "other") for w in ws)

    def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        return profile.timed(matmuls(w), backend.linear)(x, w, b)

    def linears(x: np.ndarray, ws: tuple, bs: tuple) -> tuple:
        return profile.timed(matmuls(*ws), backend.linears)(x, ws, bs)

    def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
        return profile.timed(matmuls(w_gate, w_up) + " silu", backend.swiglu)(x, w_gate, w_up)

    return Backend(
        backend.name,
        linear=linear,
        linears=linears,
        rms_norm=profile.timed("rms_norm", backend.rms_norm),
        apply_rope=profile.timed("rope", backend.apply_rope),
        attention=profile.timed("attention", backend.attention),
        swiglu=swiglu,
    )
