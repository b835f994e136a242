"""`--profile`: where a run's time goes, by operation, printed on stderr afterwards.

A `Profile` is a model's recorder (`qwen_ref.trace`): the forward pass hands it each named
intermediate as it is made, and the time since the previous one is charged to the operation that
made it (attn_norm: rms_norm; Qcur: the q/k/v projections; kqv_out: the KV cache write and
attention; ...). The operations are synchronous, so the time between two names is the time of the
work between them. A model with a recorder runs decode steps layer by layer rather than in one fused
call (`QwenModel.fused_decode`), a few percent slower.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

# The work charged to each intermediate: what ran between the previous name and this one. Names not
# listed (Kcur, Vcur: made by the call that made Qcur) leave the clock running to the next name.
OPERATIONS = {
    "attn_norm": "rms_norm", "ffn_norm": "rms_norm", "result_norm": "rms_norm",
    "Qcur": "matmul q_proj+k_proj+v_proj",
    "Qcur_rope": "rope", "Kcur_rope": "rope",
    "kqv_out": "attention (with the KV cache write)",
    "attn_out": "matmul o_proj",
    "ffn_inp": "residual add", "l_out": "residual add",
    "ffn_act": "matmul gate_proj+up_proj silu",
    "ffn_out": "matmul down_proj",
    "result_output": "matmul lm_head",
}


class Profile:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._last = time.perf_counter()

    def wants(self, name: str, layer: int | None) -> bool:
        """Nothing beyond what the forward pass makes anyway (no ffn_gate/ffn_up of their own)."""
        return name in OPERATIONS

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        now = time.perf_counter()
        if name == "inp_embd":  # a forward call starts: what came before it is not the model's
            self._last = now
        elif name in OPERATIONS:
            self.seconds[OPERATIONS[name]] += now - self._last
            self.calls[OPERATIONS[name]] += 1
            self._last = now

    def timed(self, name: str, fn: Callable) -> Callable:
        """`fn`, adding its wall time to `name` (for work outside the model, such as sampling)."""

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
        lines = [f"{'operation':<38} {'calls':>7} {'total ms':>10} {'share':>7} {'ms/token':>9}"]
        for name, seconds in sorted(self.seconds.items(), key=lambda item: -item[1]):
            lines.append(
                f"{name:<38} {self.calls[name]:>7} {seconds * 1e3:>10.1f} {seconds / total:>7.1%} "
                f"{seconds * 1e3 / max(tokens, 1):>9.3f}"
            )
        return "\n".join(lines)
