"""What a 16-bit KV cache does to the logits: every committed fixture, both backends, bfloat16 and float16
against the float32 cache (which is exact against transformers).

    python tools/kv_dtype_error.py     # writes benchmarks/kv_dtype_error.md (seconds; no torch needed)

For each case in tests/fixtures: its prompt in one forward pass with a float32 cache and with a 16-bit one
(max |logit difference|, that over max(1, max |logit|), and in units of the cache's rounding unit u: 2^-8
for bfloat16, 2^-11 for float16; the prompt positions whose argmax changed), and greedy generation of the
fixture's budget, which runs the decode path (on numba the one-call DecoderStack): whether its tokens are
those of the float32 cache. The README's table summarises the worst case of each dtype.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref and jitkernels, whatever is installed

from qwen_ref.backends import BACKEND_NAMES, get_backend  # noqa: E402
from qwen_ref.config import load_generation_config  # noqa: E402
from qwen_ref.generation import generate  # noqa: E402
from qwen_ref.model import load_model  # noqa: E402
from qwen_ref.sampling import GREEDY, Sampler  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # half a unit in the last place, relative: 2^-(significant bits)


@dataclass(frozen=True)
class Row:
    case: str
    backend: str
    kv_dtype: str
    tokens: int
    max_logit: float  # max |logit| with the float32 cache
    max_error: float  # max |logit difference| against the float32 cache
    argmax_changed: int  # prompt positions whose top token differs
    greedy_same: bool  # greedy tokens identical to the float32 cache's
    greedy_first_difference: int | None  # index of the first differing new token

    @property
    def relative(self) -> float:
        return self.max_error / max(1.0, self.max_logit)

    @property
    def in_units(self) -> float:
        return self.relative / UNIT[self.kv_dtype]


def greedy(model, case: Path, prompt: list[int], budget: int) -> list[int]:
    eos = load_generation_config(case, model.config).eos_token_ids
    return list(generate(model, prompt, budget, eos, Sampler(GREEDY)))


def measure(case: Path, backend: str) -> list[Row]:
    ref = np.load(case / "reference.npz")
    prompt, budget = ref["prompt_tokens"], int(ref["max_new_tokens"])
    model = load_model(case, get_backend(backend))  # float32 cache
    base = model.forward(prompt, model.new_cache(len(prompt)))  # [T, V]
    base_tokens = greedy(model, case, prompt.tolist(), budget)
    rows = []
    for kv_dtype in UNIT:
        model.kv_dtype = kv_dtype
        logits = model.forward(prompt, model.new_cache(len(prompt)))  # [T, V]
        tokens = greedy(model, case, prompt.tolist(), budget)
        first = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), None)
        if first is None and len(tokens) != len(base_tokens):
            first = min(len(tokens), len(base_tokens))
        rows.append(Row(case.name, backend, kv_dtype, len(prompt), float(np.abs(base).max()),
                        float(np.abs(logits - base).max()),
                        int(np.count_nonzero(logits.argmax(-1) != base.argmax(-1))), first is None, first))
    return rows


def markdown(rows: list[Row], command: str) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    lines = ["# Logit error of a 16-bit KV cache", "",
             f"`{command}`, {time.strftime('%Y-%m-%d')} at {head.strip() or '?'}; numpy {np.__version__}, "
             f"numba {numba.__version__}, {platform.machine()}. Each fixture's prompt in one forward pass with the "
             "16-bit cache against the float32 cache; max |logit difference| absolute, relative to max(1, max "
             "|logit|), and in units of the cache's rounding unit u (2^-8 bfloat16, 2^-11 float16); prompt "
             "positions whose argmax changed; greedy generation of the fixture's budget (the decode path) against "
             "the float32 cache's tokens.", "", "## Worst case", ""]
    lines += ["| kv dtype | backend | max abs | max relative | max relative / u | argmax changed | "
              "greedy tokens same |", "|---|---|---|---|---|---|---|"]
    for kv_dtype in UNIT:
        for backend in BACKEND_NAMES:
            sel = [r for r in rows if r.kv_dtype == kv_dtype and r.backend == backend]
            lines.append(f"| {kv_dtype} | {backend} | {max(r.max_error for r in sel):.3g} | "
                         f"{max(r.relative for r in sel):.3g} | {max(r.in_units for r in sel):.1f} | "
                         f"{sum(r.argmax_changed for r in sel)} of {sum(r.tokens for r in sel)} positions | "
                         f"{sum(r.greedy_same for r in sel)} of {len(sel)} cases |")
    lines += ["", "## Every case", "",
              "| case | backend | kv dtype | prompt | max \\|logit\\| | max abs | relative | / u | argmax changed "
              "| greedy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        greedy_text = "same" if r.greedy_same else f"differs from token {r.greedy_first_difference}"
        lines.append(f"| {r.case} | {r.backend} | {r.kv_dtype} | {r.tokens} | {r.max_logit:.3g} | {r.max_error:.3g} | "
                     f"{r.relative:.3g} | {r.in_units:.1f} | {r.argmax_changed} | {greedy_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "kv_dtype_error.md",
                        help="the Markdown report (default: benchmarks/kv_dtype_error.md)")
    args = parser.parse_args(argv)
    cases = sorted(p for p in FIXTURES.iterdir() if (p / "reference.npz").is_file())
    rows = [row for case in cases for backend in BACKEND_NAMES for row in measure(case, backend)]
    report = markdown(rows, "python tools/kv_dtype_error.py")
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
