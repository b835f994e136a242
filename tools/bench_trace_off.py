"""What the trace hook costs when nothing records: today's QwenModel against the one before the hook
(`git show BASE:qwen_ref/model.py`, loaded beside it), on the same memory-mapped weights, in one process.

Rounds alternate which model goes first. Each round times, for both: numba decode (the fused
one-token step: the hook is not even called), numba prefill (layer by layer: every intermediate goes
through `QwenModel._record`, which returns at once) and numpy decode (layer by layer too). Prints
medians and the ratio hook/baseline per workload, with the host, and writes benchmarks/trace_off.md.

    python tools/bench_trace_off.py [--base 2273a9d] [--rounds 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench import REPO, ensure_checkpoint, lscpu

from qwen_ref.backends import get_backend
from qwen_ref.config import load_config
from qwen_ref.generation import prefill
from qwen_ref.model import LAST_ROW, QwenModel
from qwen_ref.weights import load_weights


def baseline_class(base: str) -> type:
    """QwenModel as it was at git revision `base`."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{base}:qwen_ref/model.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QwenModel


def decode_rate(model, context: int, steps: int) -> float:
    """tokens/s of `steps` one-token steps after `context` prompt tokens."""
    cache = model.new_cache(context + steps)
    prefill(model, np.arange(1, context + 1), cache)
    start = time.perf_counter()
    for _ in range(steps):
        model.forward(np.array([7]), cache, LAST_ROW)
    return steps / (time.perf_counter() - start)


def prefill_rate(model, prompt: int) -> float:
    start = time.perf_counter()
    prefill(model, np.arange(1, prompt + 1), model.new_cache(prompt))
    return prompt / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="2273a9d", help="the revision before the hook (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    ckpt = ensure_checkpoint(REPO / "benchmarks" / "checkpoints", "0.5b", "bf16")
    config = load_config(ckpt)
    weights = load_weights(ckpt, config)
    Baseline = baseline_class(args.base)
    workloads = {
        "numba decode, 128-token context, 32 steps (tok/s)": ("numba", lambda m: decode_rate(m, 128, 32)),
        "numba prefill, 128 tokens (tok/s)": ("numba", lambda m: prefill_rate(m, 128)),
        "numpy decode, 32-token context, 8 steps (tok/s)": ("numpy", lambda m: decode_rate(m, 32, 8)),
    }
    models = {(kind, backend): cls(config, weights, get_backend(backend))
              for kind, cls in (("hook", QwenModel), ("baseline", Baseline)) for backend in ("numba", "numpy")}
    for name, (backend, run) in workloads.items():  # warm-up: compile, fault the weights in
        for kind in ("hook", "baseline"):
            run(models[kind, backend])
    rates = {(name, kind): [] for name in workloads for kind in ("hook", "baseline")}
    for r in range(args.rounds):
        order = ("hook", "baseline") if r % 2 == 0 else ("baseline", "hook")
        for name, (backend, run) in workloads.items():
            for kind in order:
                rates[name, kind].append(run(models[kind, backend]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    cpu = lscpu() or {}
    lines = ["# The trace hook with nothing recording, against the model before it", "",
             f"`python tools/bench_trace_off.py --base {args.base} --rounds {args.rounds}`, "
             f"{time.strftime('%Y-%m-%d')}, host: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPUs; "
             "checkpoint: random Qwen1.5-0.5B shape, bf16, warm in the page cache. One process, the same "
             "memory-mapped weights; rounds alternate which model runs first.", "",
             f"CPU flags: {cpu.get('Flags', '?')}", "",
             "| workload | baseline median | hook median | hook / baseline | per-round ratios |", "|---|---|---|---|---|"]
    for name in workloads:
        base, hook = rates[name, "baseline"], rates[name, "hook"]
        ratios = [h / b for h, b in zip(hook, base)]
        lines.append(f"| {name} | {statistics.median(base):.2f} | {statistics.median(hook):.2f} | "
                     f"{statistics.median(hook) / statistics.median(base):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in ratios)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "trace_off.md").write_text(text)


if __name__ == "__main__":
    main()
