"""How fast a bfloat16 GEMV reads on this machine, against the float32 streaming read that tools/bench.py
takes as the decode ceiling: qwen-ref's GEMV, and a hand-written C loop with and without software prefetch.

A decode step of a bf16 checkpoint reads every weight once, widening each 16-bit word to float32 on the
way (a shift or a mask per 8 words) and multiplying it by x. tools/bench.py judges that step against a
float32 sum of as many bytes, which does none of this work. Here, round after round:
  - `stream`: tools/bench.py's streaming read (bench_workers.stream_kernel) of an all-ones float32 array
    of --gib GiB, in rows of 4 KB;
  - `bf16 read`: tools/bench.py's bfloat16 read bound (bench_workers.bf16_read_kernel: widening and
    adding, no x) over a random bfloat16 matrix of --gib GiB, rows of --n-in words (1024 is
    Qwen1.5-0.5B's hidden size), which every GEMV below reads too;
  - `qwen-ref GEMV`: the kernel a decode step runs (jitkernels.matmul._gemv), over that matrix;
  - `C GEMV`: an AVX2 loop in C, compiled here with `--cc`: per 64 bytes of pairs two 32-byte loads,
    two shifts, two masks and four fused multiply-adds; called from a Numba prange that gives each
    thread an equal range of rows, as _gemv's prange does;
  - `C GEMV, prefetch`: the same loop asking for the data --prefetch-bytes ahead of each 64 bytes it
    reads (prefetcht0);
  - `... in calls`: qwen-ref's GEMV and the C GEMV with prefetch over the same matrix cut into calls of
    --call-mb MB, each its own parallel region, as a decode step runs its GEMVs one after another
    (Qwen1.5-0.5B's step: 96 regions over its 617 MB of bf16 layer weights, 2 to 11.5 MB each, then the LM head).
Every GEMV is first checked against the exact product. Each figure is a fraction of its round's stream.
C is not a dependency of qwen-ref: this measures the machine, for the decode target of tools/bench.py
(90% of the streaming read), which a bf16 decode can reach only if its GEMVs read at least that fast.

    python tools/bench_bf16_read.py     # writes benchmarks/bf16_read.json and benchmarks/bf16_read.md
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench import REPO, git_state, machine_info, versions
from bench_plan import NOISY_CORES
from bench_workers import CpuLoad, bf16_read_kernel, stream_kernel, wait_for_quiet
from numba import njit, prange

from jitkernels.matmul import _gemv
from qwen_ref.errors import QwenRefError
from qwen_ref.threads import set_threads

KERNELS = ("stream", "bf16 read", "qwen-ref GEMV", "C GEMV", "C GEMV, prefetch", "qwen-ref GEMV in calls",
           "C GEMV, prefetch, in calls")
GEMVS = KERNELS[2:]

C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* y[r] = sum_j widen(w[r, j]) * x[j] for rows of n bfloat16 pairs (n a multiple of 16), x split into its
   even (low words) and odd (high words) elements. */
static inline void dot_rows(const uint32_t *w, const float *xe, const float *xo, float *y, long rows, long n,
                            const int prefetch) {
    const __m256i high_mask = _mm256_set1_epi32((int)0xFFFF0000);
    for (long r = 0; r < rows; r++) {
        const uint32_t *row = w + r * n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long j = 0; j < n; j += 16) {  /* 64 bytes of pairs */
            if (prefetch) _mm_prefetch((const char *)(row + j) + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i p0 = _mm256_loadu_si256((const __m256i *)(row + j));
            __m256i p1 = _mm256_loadu_si256((const __m256i *)(row + j + 8));
            a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p0, 16)), _mm256_loadu_ps(xe + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p0, high_mask)), _mm256_loadu_ps(xo + j), a1);
            a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p1, 16)), _mm256_loadu_ps(xe + j + 8), a2);
            a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(p1, high_mask)), _mm256_loadu_ps(xo + j + 8), a3);
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        y[r] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
}
void gemv(const uint32_t *w, const float *xe, const float *xo, float *y, long rows, long n) {
    dot_rows(w, xe, xo, y, rows, n, 0);
}
void gemv_prefetch(const uint32_t *w, const float *xe, const float *xo, float *y, long rows, long n) {
    dot_rows(w, xe, xo, y, rows, n, 1);
}
"""


def main() -> None:
    a = parse_args()
    try:
        threads = set_threads(a.threads)
    except QwenRefError as exc:
        sys.exit(f"error: {exc}")
    c_gemv, c_gemv_prefetch = (split_rows(f, threads) for f in compile_c(a.cc, a.prefetch_bytes))
    pairs, x = bf16_matrix(a.gib, a.n_in)  # [rows, n_in/2] uint32, [1, n_in] float32
    words = np.ones((pairs.nbytes // 4096, 1024), dtype=np.float32)  # the stream's array, as large
    runs = kernel_runs(pairs, x, words, c_gemv, c_gemv_prefetch, a.call_mb)
    agreement = check_agreement(runs, pairs, x)
    for run, _, _ in runs.values():  # compile and fault every page in
        run()
    rounds, disturbed = [], 0
    while len(rounds) < a.rounds:
        wait_for_quiet(a.quiet_wait)
        rates, loads = measure_round(runs, reverse=len(rounds) % 2 == 1)
        busiest = max(loads.values())
        if busiest > NOISY_CORES and disturbed < a.rounds:
            disturbed += 1  # another process or the hypervisor took a share of a core: measure the round again
            print(f"round {len(rounds) + 1} disturbed ({busiest:.2f} cores), measuring it again", file=sys.stderr)
            continue
        rounds.append({"GB/s": rates, "other_and_steal_cores": loads})
        print(f"round {len(rounds)}: " + ", ".join(f"{k} {rates[k]:.1f}" for k in KERNELS) + " GB/s", file=sys.stderr)
        time.sleep(a.pause)
    results = {"command": " ".join(["python", "tools/bench_bf16_read.py", *sys.argv[1:]]),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "versions": versions(),
               "git": git_state(), "threads": threads, "bytes": pairs.nbytes, "n_in": a.n_in,
               "prefetch_bytes": a.prefetch_bytes, "call_mb": a.call_mb, "agreement": agreement,
               "disturbed_rounds": disturbed, "rounds": rounds}
    text = report(results)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(text)
    print(text)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="rounds, each kernel 3 times per round")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between rounds (the host drifts over minutes)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="seconds to wait at most before each round for other processes to leave the CPUs")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the matrix (and of the stream's array)")
    ap.add_argument("--n-in", type=int, default=1024, help="bfloat16 words per row, a multiple of 32")
    ap.add_argument("--call-mb", type=float, default=4.0, help="size of each call of the GEMVs 'in calls'")
    # 1024 read fastest here of 512, 1024, 2048 and 4096 (4096 much slower): rerun with this option to see
    ap.add_argument("--prefetch-bytes", type=int, default=1024, help="how far ahead the C GEMV prefetches")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of every kernel")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bf16_read.json",
                    help="results (JSON); the table goes beside it as .md")
    a = ap.parse_args()
    if a.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    if not 0 <= a.pause <= 600:
        sys.exit(f"error: --pause must be between 0 and 600 seconds, got {a.pause}")
    if not 0 <= a.quiet_wait <= 600:
        sys.exit(f"error: --quiet-wait must be between 0 and 600 seconds, got {a.quiet_wait}")
    if a.n_in < 32 or a.n_in % 32:
        sys.exit(f"error: --n-in must be a positive multiple of 32 (whole 64 bytes of pairs), got {a.n_in}")
    if not (math.isfinite(a.gib) and a.gib * 2**30 >= 2 * a.n_in * 64):
        sys.exit(f"error: --gib {a.gib} holds fewer than 64 rows of {a.n_in} words")
    available = available_memory_bytes()
    if 2.2 * a.gib * 2**30 > available:  # the matrix, the stream's array and a block being made
        sys.exit(f"error: --gib {a.gib} needs about {2.2 * a.gib:.1f} GiB, {available / 2**30:.1f} GiB is available")
    if not (math.isfinite(a.call_mb) and 2 * a.n_in * 2 <= a.call_mb * 2**20 <= a.gib * 2**30):
        sys.exit(f"error: --call-mb must hold 2 rows of {a.n_in} words and fit in --gib, got {a.call_mb}")
    if not 0 <= a.prefetch_bytes <= 1 << 20:
        sys.exit(f"error: --prefetch-bytes must be between 0 and 1 MiB, got {a.prefetch_bytes}")
    if not (a.out.parent.is_dir() and os.access(a.out.parent, os.W_OK)):
        sys.exit(f"error: --out: folder {a.out.parent} does not exist or is not writable")
    return a


def available_memory_bytes() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE).group(1)) * 1024


def compile_c(cc: str, prefetch_bytes: int) -> tuple[Callable, Callable]:
    """The two C GEMVs (w, x_even, x_odd, y, rows, n), compiled for this CPU into a temporary library
    (it stays mapped after the folder is deleted)."""
    if not {"avx2", "fma"} <= set(machine_info()["cpu_flags"]):
        sys.exit("error: the C GEMV needs AVX2 and FMA, which this CPU lacks")
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
        src.write_text(C_SOURCE)
        try:
            done = subprocess.run([cc, "-O3", "-mavx2", "-mfma", f"-DPREFETCH_BYTES={prefetch_bytes}", "-shared",
                                   "-fPIC", str(src), "-o", str(lib)], capture_output=True, text=True, check=False)
        except OSError as exc:
            sys.exit(f"error: cannot run the C compiler {cc!r}: {exc.strerror}")
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            sys.exit(f"error: {cc} could not compile the C GEMV: {next((s for s in lines if 'error' in s), lines[0])}")
        try:
            c = ctypes.CDLL(str(lib))
            functions = (c.gemv, c.gemv_prefetch)
        except (OSError, AttributeError) as exc:
            sys.exit(f"error: {cc} did not make a library with the C GEMV: {str(exc).splitlines()[0]}")
    for f in functions:
        f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2
        f.restype = None
    return functions


def split_rows(c_gemv: Callable, threads: int) -> Callable:
    """c_gemv over a matrix's rows in `threads` equal ranges, one per iteration of a Numba prange (as
    _gemv's prange splits its rows), so the C loop runs on the same threads as the Numba kernels."""

    @njit(parallel=True)
    def run(pairs, x_even, x_odd, y):
        rows, n = pairs.shape
        for t in prange(threads):
            r0, r1 = t * rows // threads, (t + 1) * rows // threads
            c_gemv(pairs[r0:].ctypes.data, x_even.ctypes.data, x_odd.ctypes.data, y[r0:].ctypes.data, r1 - r0, n)

    return run


def bf16_matrix(gib: float, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Random bfloat16 words with magnitudes in [2^-7, 2) and either sign, as uint32 pairs [rows, n_in/2], and x."""
    rows = int(gib * 2**30) // (2 * n_in)
    rng = np.random.default_rng(0)
    words = np.empty((rows, n_in), dtype=np.uint16)
    for r0 in range(0, rows, 1 << 16):  # in blocks: no temporaries the size of the matrix
        block = words[r0 : r0 + (1 << 16)]
        block[:] = rng.integers(0x3C00, 0x4000, size=block.shape, dtype=np.uint16)  # exponents 2^-7 .. 2^0
        block |= rng.integers(0, 2, size=block.shape, dtype=np.uint16) << np.uint16(15)  # sign
    x = rng.standard_normal((1, n_in)).astype(np.float32)  # [1, n_in]
    return words.view(np.uint32), x


def kernel_runs(pairs: np.ndarray, x: np.ndarray, words: np.ndarray, c_gemv: Callable, c_gemv_prefetch: Callable,
                call_mb: float) -> dict[str, tuple[Callable[[], None], np.ndarray | None, int]]:
    """For each kernel: a call that reads its array once, the [rows] float32 outputs of a GEMV (None for the
    reads), and the bytes it reads."""
    x_even, x_odd = np.ascontiguousarray(x[0, 0::2]), np.ascontiguousarray(x[0, 1::2])  # [n_in/2] each
    ys = {name: np.empty((1, len(pairs)), dtype=np.float32) for name in GEMVS}  # [1, rows] each
    sums = np.empty(max(len(words), len(pairs)), dtype=np.float32)  # the reads' row sums, not looked at
    no_bias = np.empty(0, dtype=np.uint16)
    stream, read_bf16 = stream_kernel(), bf16_read_kernel()
    rows_per_call = max(2, int(call_mb * 2**20) // pairs.strides[0])
    calls = [slice(r0, r0 + rows_per_call) for r0 in range(0, len(pairs), rows_per_call)]

    def qwen_gemv_in_calls(y):
        for rows in calls:
            _gemv(x, (pairs[rows],), (no_bias,), (y[:, rows],))

    def c_gemv_in_calls(y):
        for rows in calls:
            c_gemv_prefetch(pairs[rows], x_even, x_odd, y[0, rows])

    gemvs = {"qwen-ref GEMV": lambda y: _gemv(x, (pairs,), (no_bias,), (y,)),
             "C GEMV": lambda y: c_gemv(pairs, x_even, x_odd, y[0]),
             "C GEMV, prefetch": lambda y: c_gemv_prefetch(pairs, x_even, x_odd, y[0]),
             "qwen-ref GEMV in calls": qwen_gemv_in_calls, "C GEMV, prefetch, in calls": c_gemv_in_calls}
    runs = {"stream": (lambda: stream(words, sums), None, words.nbytes),
            "bf16 read": (lambda: read_bf16(pairs, sums), None, pairs.nbytes)}
    for name in GEMVS:
        runs[name] = (functools.partial(gemvs[name], ys[name]), ys[name][0], pairs.nbytes)
    return runs


def check_agreement(runs: dict, pairs: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Every GEMV, run once over outputs set to nan, against the exact products (float64: a bfloat16 times
    a float32 is exact there), as the largest error over all rows in units of n * 2^-24 * sum |terms|,
    a bound on the error of a float32 dot product of n terms in any order, with or without fused
    multiply-adds, when nothing underflows (here |w| >= 2^-7). Exits if a GEMV breaks it."""
    outputs = {}
    for name in GEMVS:
        run, y, _ = runs[name]
        y.fill(np.nan)  # a row the GEMV does not write stays nan and fails the check
        run()
        outputs[name] = y.copy()
    n_in = x.shape[1]
    x64 = x[0].astype(np.float64)  # [n_in]
    worst = dict.fromkeys(outputs, 0.0)
    for r0 in range(0, len(pairs), 4096):  # in blocks: the whole matrix in float64 would not fit
        block = pairs[r0 : r0 + 4096].view(np.uint16)  # [rows, n_in] in element order (little-endian pairs)
        w = (block.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # [rows, n_in]
        exact = w @ x64  # [rows]
        bound = n_in * 2.0**-24 * (np.abs(w) @ np.abs(x64))  # [rows]
        for name, got in outputs.items():
            error = np.max(np.abs(got[r0 : r0 + 4096] - exact) / bound)  # nan if a row was not written
            worst[name] = float(np.maximum(worst[name], error))  # np.maximum keeps a nan, max() would not
    for name, ratio in worst.items():
        if not ratio <= 1.0:  # nan included
            sys.exit(f"error: {name} is off the exact product by {ratio:.3g} times the float32 dot product bound")
    return {name: round(ratio, 4) for name, ratio in worst.items()}


def measure_round(runs: dict, reverse: bool) -> tuple[dict[str, float], dict[str, float]]:
    """GB/s of each kernel, the median of 3 reads (one disturbed read does not count), in the order of
    KERNELS or, every other round, the reverse; and the cores that other processes and the hypervisor
    took during each kernel's reads. An untimed read first: the first read after a pause runs slower.
    Not bench_workers.measure, which reruns a disturbed repeat alone: here the caller reruns the whole
    round, so that every fraction compares kernels read under one state of the host."""
    runs["stream"][0]()
    rates, loads = {}, {}
    for name in KERNELS[::-1] if reverse else KERNELS:
        run, _, nbytes = runs[name]
        times, load = [], CpuLoad()
        with load.measuring():
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        rates[name] = nbytes / float(np.median(times)) / 1e9
        loads[name] = round(load.cores() + load.steal / max(load.wall, 1e-9), 3)
    return rates, loads


def report(results: dict) -> str:
    """The table of results.json: each kernel's GB/s and fraction of the stream over the rounds, then every round."""
    rates = [r["GB/s"] for r in results["rounds"]]
    stream = np.array([r["stream"] for r in rates])
    m = results["machine"]
    lines = ["# bfloat16 GEMV reads against the float32 streaming read", "",
             (f"`{results['command']}`, finished {results['finished']} at {results['git']['head'][:7]}; "
              f"{m['cpu_model']}, {results['threads']} threads, {results['bytes'] / 2**30:.2f} GiB per read, rows of "
              f"{results['n_in']} bfloat16 words; the C GEMV prefetches {results['prefetch_bytes']} bytes ahead; "
              f"'in calls': calls of {results['call_mb']:g} MB. Per round, each kernel's median of 3 reads, kernels "
              "in alternating order; the fraction is of the same round's stream. Rounds measured again because "
              f"other processes or the hypervisor took more than {NOISY_CORES} of a core during a kernel: "
              f"{results['disturbed_rounds']}."), "",
             ("Largest error of each GEMV against the exact product, in units of the float32 dot product bound "
              "(n 2^-24 sum |terms|): " + ", ".join(f"{k} {v}" for k, v in results["agreement"].items()) + "."), "",
             "| kernel | GB/s, median (min–max) | of stream, median (min–max) |", "|---|---|---|"]
    for name in KERNELS:
        rate = np.array([r[name] for r in rates])
        fraction = rate / stream
        lines.append(f"| {name} | {np.median(rate):.1f} ({rate.min():.1f}–{rate.max():.1f}) | "
                     f"{np.median(fraction):.3f} ({fraction.min():.3f}–{fraction.max():.3f}) |")
    gain = np.array([r["C GEMV, prefetch"] / r["qwen-ref GEMV"] for r in rates])
    lines += ["", (f"C GEMV with prefetch / qwen-ref GEMV, per round: median {np.median(gain):.3f} "
                   f"({gain.min():.3f}–{gain.max():.3f})."), "",
              "| round | stream GB/s | " + " | ".join(f"{k}, of stream" for k in KERNELS[1:]) + " |",
              "|---|---|" + "---|" * (len(KERNELS) - 1)]
    for i, r in enumerate(rates, 1):
        lines.append(f"| {i} | {r['stream']:.1f} | " + " | ".join(f"{r[k] / r['stream']:.3f}" for k in KERNELS[1:])
                     + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
