"""Why the blas prefill GEMM calls OpenBLAS from inside Numba's threads: the plain way stalls.

    python tools/bench_blas_contention.py            # 0.5B bf16 checkpoint, 128-token prefill, 5 rounds

Three ways to run a prefill's products, alternating in one process (as a prefill alternates them
with the other Numba kernels): `numba-gemm` and `blas-gemm` (`--kernels`), and `plain-blas`: each
weight widened by a Numba parallel loop into a float32 scratch, then `x @ W.T` by NumPy on OpenBLAS's
own threads (as many as Numba's). Each setting of the thread pools' waiting runs in its own process,
since both read it when they load: the defaults; OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS's idle workers
sleep after 2^4 cycles instead of spinning ~2^28); OMP_WAIT_POLICY=passive (Numba's OpenMP workers
sleep at once). Prints prefill tokens/s (median of rounds) and the ratio to numba-gemm, with the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"defaults": {}, "OPENBLAS_THREAD_TIMEOUT=4": {"OPENBLAS_THREAD_TIMEOUT": "4"},
            "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"}}


def run_in_process(model_dir: str, prompt: int, rounds: int) -> dict:
    import jitkernels
    from jitkernels.widen import as_kernel_dtype, widen_rows
    from qwen_ref import load_model
    from qwen_ref.backends import get_backend
    from qwen_ref.generation import prefill
    from qwen_ref.mlp import silu_mul
    from qwen_ref.threads import set_threads
    from qwen_ref.weights import to_float32

    set_threads()
    scratch: dict[tuple, np.ndarray] = {}

    def plain_linear(x, w, b=None):
        if x.shape[0] < 4:
            return jitkernels.linear(x, w, b)
        w = as_kernel_dtype(w)
        y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)  # [T, n_out]
        for s in range(0, w.shape[0], 4096):  # blocks of rows, as the NumPy twin (the tied LM head)
            block = w[s : s + 4096]
            wide = scratch.setdefault(block.shape, np.empty(block.shape, dtype=np.float32))
            widen_rows(block, wide)
            np.matmul(x, wide.T, out=y[:, s : s + 4096])
        if b is not None:
            y += to_float32(b)
        return y

    numba_backend = get_backend("numba", "numba-gemm")
    plain = dataclasses.replace(
        numba_backend, name="plain-blas", linear=plain_linear,
        linears=lambda x, ws, bs: tuple(plain_linear(x, w, b) for w, b in zip(ws, bs)),
        swiglu=lambda x, g, u: silu_mul(plain_linear(x, g), plain_linear(x, u)) if x.shape[0] >= 4
        else jitkernels.swiglu(x, g, u))
    backends = {"numba-gemm": numba_backend, "blas-gemm": get_backend("numba", "blas-gemm"), "plain-blas": plain}
    model = load_model(model_dir, numba_backend)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt)

    def tok_s(name: str) -> float:
        model.backend = backends[name]
        cache = model.new_cache(prompt)
        start = time.perf_counter()
        prefill(model, tokens, cache)
        return prompt / (time.perf_counter() - start)

    names = list(backends)
    for name in names:
        tok_s(name)  # warm-up
    got = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            got[name].append(tok_s(name))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "benchmarks" / "checkpoints" / "qwen1.5-0.5b-bfloat16"))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_in_process(args.model, args.prompt, args.rounds)))
        return
    print(f"prefill {args.prompt} tokens, {args.rounds} rounds; tokens/s median (x numba-gemm, median of rounds)")
    for label, env in SETTINGS.items():
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--worker", "--model", args.model, "--prompt", str(args.prompt),
                              "--rounds", str(args.rounds)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO)
        got = {k: np.array(v) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}
        cells = ", ".join(f"{k} {np.median(v):.0f} ({np.median(v / got['numba-gemm']):.2f}x)" for k, v in got.items())
        print(f"{label:27s} {cells}; load {load:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
