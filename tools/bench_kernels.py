"""Benchmark the Numba kernels against their NumPy twins and against the machine's limits.

    python tools/bench_kernels.py                   # every section, results on stdout
    python tools/bench_kernels.py gemv --repeats 31 # one section

Sections:
  gemv       decode matrix-vector products on Qwen1.5-0.5B shapes, in GB/s of weights read,
             against a parallel Numba loop that only streams the same bytes (the bandwidth bound)
             and, for bfloat16, one that also widens them (the bound of a GEMV that widens so)
  gemm       prefill products (512 tokens, swiglu included) in GFLOP/s, against NumPy's BLAS on float32 weights
  attention  prefill and decode attention against the NumPy twin
  small      RMSNorm and RoPE at T = 1 and T = 512
  jit        compile time of every kernel in a fresh process with an empty cache, then warm

Times are the median (and best) of --repeats runs: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_workers import bf16_read_kernel, stream_kernel  # noqa: E402  (tools/ is sys.path[0] when run as a script)

import jitkernels  # noqa: E402
from qwen_ref.backends import NUMPY  # noqa: E402

SECTIONS = ("gemv", "gemm", "attention", "small", "jit")


def report(name: str, fn: Callable[[], object], repeats: int, work: float, unit: str) -> None:
    """Print the median and best time of fn() over `repeats` runs (after a warm-up), and work / time."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median, best = float(np.median(times)), float(np.min(times))
    print(f"{name:58s} {median * 1e3:9.3f} ms  {work / median:8.1f} {unit} (best {work / best:.1f})", flush=True)
    # After NumPy's BLAS, OpenBLAS's worker threads keep spinning for a while and a Numba parallel
    # region that starts then waits a whole time slice (8 ms) for its own worker; let them sleep.
    time.sleep(0.5)


def stored(rng: np.random.Generator, shape: tuple[int, int], dtype: str) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if dtype == "bf16":
        w = (w.view(np.uint32) >> 16).astype(np.uint16)
    elif dtype == "f16":
        w = w.astype(np.float16)
    w.setflags(write=False)
    return w


def bench_gemv(repeats: int) -> None:
    rng = np.random.default_rng(0)
    for n_out, n_in in [(151936, 1024), (2816, 1024), (1024, 2816), (1024, 1024)]:
        n_repeats = repeats if n_out > 10000 else 20 * repeats
        x = rng.standard_normal((1, n_in), dtype=np.float32)
        for dtype in ("bf16", "f16", "f32"):
            w = stored(rng, (n_out, n_in), dtype)
            name = f"gemv [{n_out},{n_in}] {dtype}"
            gigabytes = w.nbytes / 1e9
            if dtype == "bf16":
                words = w.view(np.float32).reshape(n_out, -1)  # the same bytes, as float32 words
                partial = np.empty(n_out, dtype=np.float32)
                report(f"{name}: stream bound", lambda: stream_kernel()(words, partial), n_repeats, gigabytes, "GB/s")
                pairs = w.view(np.uint32)  # the same bytes, widened as the GEMV widens them
                report(f"{name}: bf16 read bound", lambda: bf16_read_kernel()(pairs, partial), n_repeats, gigabytes, "GB/s")
            report(f"{name}: numba", lambda: jitkernels.linear(x, w, None), n_repeats, gigabytes, "GB/s")
            if n_out < 10000 or dtype == "bf16":
                report(f"{name}: numpy twin", lambda: NUMPY.linear(x, w, None), max(3, repeats // 4), gigabytes, "GB/s")


def bench_gemm(repeats: int) -> None:
    rng = np.random.default_rng(0)
    T = 512
    for n_out, n_in in [(2816, 1024), (1024, 2816), (1024, 1024), (151936, 1024)]:
        n_repeats = max(3, repeats // 4) if n_out > 10000 else repeats
        x = rng.standard_normal((T, n_in), dtype=np.float32)
        flops = 2 * T * n_out * n_in / 1e9
        w32 = stored(rng, (n_out, n_in), "f32")
        report(f"gemm T={T} [{n_out},{n_in}] f32: numpy BLAS x @ W.T", lambda: x @ w32.T, n_repeats, flops, "GFLOP/s")
        for dtype in ("bf16", "f16", "f32"):
            w = stored(rng, (n_out, n_in), dtype)
            name = f"gemm T={T} [{n_out},{n_in}] {dtype}"
            report(f"{name}: numba", lambda: jitkernels.linear(x, w, None), n_repeats, flops, "GFLOP/s")
            if dtype == "bf16":
                report(f"{name}: numpy twin", lambda: NUMPY.linear(x, w, None), n_repeats, flops, "GFLOP/s")
    x = rng.standard_normal((T, 1024), dtype=np.float32)
    w_gate, w_up = stored(rng, (2816, 1024), "bf16"), stored(rng, (2816, 1024), "bf16")
    name = f"swiglu T={T} [2816,1024] x2 bf16"
    flops = 4 * T * 2816 * 1024 / 1e9
    report(f"{name}: numba", lambda: jitkernels.swiglu(x, w_gate, w_up), repeats, flops, "GFLOP/s")
    report(f"{name}: numpy twin", lambda: NUMPY.swiglu(x, w_gate, w_up), repeats, flops, "GFLOP/s")
    w = stored(rng, (2816, 1024), "bf16")
    for T in (2, 3, 4, 8, 16):  # few rows: GEMV up to 3, then GEMM; in GB/s of weights read
        x = rng.standard_normal((T, 1024), dtype=np.float32)
        name = f"linear T={T} [2816,1024] bf16: numba"
        report(name, lambda: jitkernels.linear(x, w, None), 20 * repeats, w.nbytes / 1e9, "GB/s")


def bench_attention(repeats: int) -> None:
    rng = np.random.default_rng(0)
    for T, past, Hkv, G in [(512, 0, 16, 1), (1, 511, 16, 1), (1, 4095, 16, 1), (1, 4095, 2, 8), (64, 1000, 16, 1)]:
        S, hd = past + T, 64
        cache = rng.standard_normal((2, Hkv, S + 100, hd), dtype=np.float32)  # keys, values [Hkv, capacity, hd]
        q = rng.standard_normal((T, Hkv * G, hd), dtype=np.float32)
        k, v = cache[0], cache[1]
        pairs = Hkv * G * (T * past + T * (T + 1) / 2) / 1e6  # (query, key) pairs scored
        name = f"attention T={T} S={S} Hkv={Hkv} G={G}"
        report(f"{name}: numba", lambda: jitkernels.attention(q, k, v, S), repeats, pairs, "Mpair/s")
        report(f"{name}: numpy twin", lambda: NUMPY.attention(q, k, v, S), max(3, repeats // 4), pairs, "Mpair/s")


def bench_small(repeats: int) -> None:
    rng = np.random.default_rng(0)
    for T in (1, 512):
        x = rng.standard_normal((T, 1024), dtype=np.float32)
        w = stored(rng, (1, 1024), "bf16")[0]
        q = rng.standard_normal((T, 16, 64), dtype=np.float32)
        cos, sin = rng.standard_normal((T, 32), dtype=np.float32), rng.standard_normal((T, 32), dtype=np.float32)
        n = 20 * repeats if T == 1 else repeats
        for name, args, size in [
            (f"rms_norm [{T},1024]", (x, w, 1e-6), x.size),
            (f"apply_rope [{T},16,64]", (q, cos, sin), q.size),
        ]:
            op = name.split()[0]
            twin = getattr(NUMPY, op)
            report(f"{name}: numba", lambda: getattr(jitkernels, op)(*args), n, size / 1e6, "Melem/s")
            report(f"{name}: numpy twin", lambda: twin(*args), n, size / 1e6, "Melem/s")


# Calls every kernel once on tiny inputs of the types the model passes, and prints the seconds taken.
_FIRST_CALLS = """
import time
start = time.perf_counter()
import numpy as np
import jitkernels
rng = np.random.default_rng(0)
x = rng.standard_normal((5, 8), dtype=np.float32)  # 5 rows: the GEMM path
for w in (rng.standard_normal((5, 8), dtype=np.float32), rng.standard_normal((5, 8)).astype(np.float16),
          (rng.standard_normal((5, 8), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)):
    w.setflags(write=False)
    jitkernels.linear(x[:1], w, w[:, 0].copy()); jitkernels.linear(x, w, None); jitkernels.rms_norm(x, w[0], 1e-6)
    jitkernels.linears(x[:1], (w, w), (None, None)); jitkernels.swiglu(x[:1], w, w); jitkernels.swiglu(x, w, w)
q = rng.standard_normal((5, 4, 8), dtype=np.float32)
cache = rng.standard_normal((2, 2, 9, 8), dtype=np.float32)
jitkernels.attention(q, cache[0], cache[1], 5)
jitkernels.apply_rope(q, x[:, :4], x[:, :4])
q16 = rng.standard_normal((5, 4, 16), dtype=np.float32)  # hd 16, 10 query rows per kv head: the tiled item
cache16 = rng.standard_normal((2, 2, 9, 16), dtype=np.float32)
jitkernels.attention(q16, cache16[0], cache16[1], 5)
print(time.perf_counter() - start)
"""


def bench_jit(repeats: int) -> None:
    """Fresh processes sharing an empty cache directory: the first compiles, the next ones load."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(REPO)}
        for run in ("first run (empty cache)", "warm start (cached)", "warm start (cached)"):
            out = subprocess.run(
                [sys.executable, "-c", _FIRST_CALLS], env=env, cwd=REPO, capture_output=True, text=True, check=True
            )
            seconds = float(out.stdout)
            print(f"jit {run:25s} {seconds:7.2f} s  (import jitkernels, one call per kernel and dtype)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per measurement (default: 11)")
    args = parser.parse_args()
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    for section in args.sections or SECTIONS:
        print(f"# {section}", file=sys.stderr, flush=True)
        globals()[f"bench_{section}"](args.repeats)


if __name__ == "__main__":
    main()
