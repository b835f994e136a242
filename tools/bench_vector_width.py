"""Whether 512-bit vectors make qwen-ref's hot kernels faster on a CPU with AVX-512: the same kernels
compiled for LLVM's own choice of vector width, for 256-bit and for 512-bit vectors, in alternating processes.

Numba compiles for the host CPU (its LLVM name and features); LLVM then picks a vector width by the
CPU's tuning: 512 bits on AMD Zen 4 (znver4), 256 bits on the Intel Xeons whose tuning has the
`prefer-256-bit` feature (skylake-avx512 to sapphirerapids in LLVM 22). Numba reads NUMBA_CPU_FEATURES at import,
so each variant runs in a process of its own, with a cache folder of its own:
  host  no override: LLVM's choice for this CPU;
  256   the host's features and `+prefer-256-bit`;
  512   the host's features and `-prefer-256-bit` (AVX-512 hosts only; on znver4 it compiles as `host`).
Each round runs every variant once, in an order that alternates round by round, holding an flock on
/tmp/qwen-ref-measure.lock so that no other timing run overlaps it; each process times (medians of
--repeats calls made while the machine was quiet), with --threads threads:
  stream       a float32 sum over the bytes of the decode weights (the streaming-read bound);
  bf16 read    tools/bench.py's `anon-bf16` read bound over those bytes (widening and adding, no x);
  decode GEMVs a decode step's products over --layers layers of the Qwen1.5-0.5B shape in bfloat16
               (linears q, k, v; o; swiglu gate, up; down), in GB/s of weights;
  GEMM         a prefill product, T = 512 by a [2816, 1024] bfloat16 weight, in GFLOP/s, and NumPy's
               sgemm (x @ W.T, float32 weights) in the same process;
  attention    a prefill chunk, T = 512 query rows at positions 1536..2047, 16 heads of 64, float32 cache.
--asm instead compiles each variant afresh (Numba cannot show the code of cached kernels) and counts
the instructions on zmm (512-bit) and ymm (256-bit) registers in the innermost loops of each kernel;
on an AVX-512 host also under sapphirerapids' tuning (`spr`, `spr-512`: what an Intel Xeon would get).

    python tools/bench_vector_width.py --asm          # instruction counts, ~30 s per variant
    python tools/bench_vector_width.py --rounds 8     # timings, ~10 min on a quiet host; the table on stdout
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LOCK = "/tmp/qwen-ref-measure.lock"
KERNELS = ("stream", "bf16 read", "decode GEMVs", "GEMM", "sgemm", "attention")
UNITS = {"stream": "GB/s", "bf16 read": "GB/s", "decode GEMVs": "GB/s", "GEMM": "GFLOP/s", "sgemm": "GFLOP/s",
         "attention": "Mpair/s"}
D, F, T_PREFILL, PAST = 1024, 2816, 512, 1536  # Qwen1.5-0.5B: hidden and intermediate sizes; the chunk


def host_features() -> str:
    import llvmlite.binding as ll

    return ll.get_host_cpu_features().flatten()


def variants() -> dict[str, dict[str, str]]:
    """Each variant's environment overrides; `512` only where the host has AVX-512."""
    features = host_features()
    out = {"host": {}, "256": {"NUMBA_CPU_FEATURES": features + ",+prefer-256-bit"}}
    if "+avx512f" in features.split(","):
        out["512"] = {"NUMBA_CPU_FEATURES": features + ",-prefer-256-bit"}
    return out


def asm_variants() -> dict[str, dict[str, str]]:
    """The variants, and on an AVX-512 host the code LLVM makes for an Intel Xeon of the same features
    (`spr`: sapphirerapids' tuning, which prefers 256 bits; `spr-512`: that tuning and `-prefer-256-bit`)."""
    out = variants()
    if "512" in out:
        features = host_features()
        out["spr"] = {"NUMBA_CPU_NAME": "sapphirerapids", "NUMBA_CPU_FEATURES": features}
        out["spr-512"] = {"NUMBA_CPU_NAME": "sapphirerapids", "NUMBA_CPU_FEATURES": features + ",-prefer-256-bit"}
    return out


# ---------------------------------------------------------------------------------------------------
# Inside a child process: one variant

def bf16_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """n bfloat16 words (uint16) of N(0, 0.02) values: a 4 MB random block repeated (speed does not
    depend on the values, and generating 600 MB of them would take longer than timing them)."""
    block = (rng.standard_normal(1 << 21, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    return np.resize(block.astype(np.uint16), n)


def layer_weights(words: np.ndarray, layers: int) -> list[dict[str, np.ndarray]]:
    """Read-only [n_out, n_in] views of `words` in the shapes of the 0.5B model's layers."""
    shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (F, D), "up": (F, D), "down": (D, F)}
    out, at = [], 0
    for _ in range(layers):
        layer = {}
        for name, (n_out, n_in) in shapes.items():
            layer[name] = words[at : at + n_out * n_in].reshape(n_out, n_in)
            layer[name].flags.writeable = False
            at += n_out * n_in
        out.append(layer)
    return out


def layer_words(layers: int) -> int:
    return layers * (4 * D * D + 3 * F * D)


def child_kernels(layers: int):
    """{name: (fn, work in the unit of UNITS)} over fresh arrays."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_workers import bf16_read_kernel, stream_kernel

    import jitkernels

    rng = np.random.default_rng(0)
    words = bf16_words(rng, layer_words(layers))  # [n] uint16, every layer's weights one after another
    weights = layer_weights(words, layers)
    as_f32 = words.view(np.float32).reshape(-1, 1024)  # the same bytes as float32 rows of 4 KB
    pairs = words.view(np.uint32).reshape(-1, 1024)  # the same bytes as bfloat16 pairs
    partial = np.empty(len(as_f32), dtype=np.float32)
    stream, read_bf16 = stream_kernel(), bf16_read_kernel()
    x1 = rng.standard_normal((1, D), dtype=np.float32)

    def decode():
        for w in weights:
            jitkernels.linears(x1, (w["q"], w["k"], w["v"]), (None, None, None))
            jitkernels.linear(x1, w["o"])
            h = jitkernels.swiglu(x1, w["gate"], w["up"])  # [1, F]
            jitkernels.linear(h, w["down"])

    x = rng.standard_normal((T_PREFILL, D), dtype=np.float32)
    w_up = weights[0]["up"]
    w32 = np.ascontiguousarray(w_up.astype(np.uint32) << 16).view(np.float32)  # [F, D] the same values
    q = rng.standard_normal((T_PREFILL, 16, 64), dtype=np.float32)
    cache = rng.standard_normal((2, 16, PAST + T_PREFILL, 64), dtype=np.float32)  # keys, values
    gb, flops = words.nbytes / 1e9, 2 * T_PREFILL * F * D / 1e9
    pairs_scored = 16 * (T_PREFILL * PAST + T_PREFILL * (T_PREFILL + 1) / 2) / 1e6
    return {
        "stream": (lambda: stream(as_f32, partial), gb),
        "bf16 read": (lambda: read_bf16(pairs, partial), gb),
        "decode GEMVs": (decode, gb),
        "GEMM": (lambda: jitkernels.linear(x, w_up, gemm="numba"), flops),
        "attention": (lambda: jitkernels.attention(q, cache[0], cache[1], PAST + T_PREFILL), pairs_scored),
        "sgemm": (lambda: x @ w32.T, flops),  # last: OpenBLAS's threads spin on after it
    }


def child_time(layers: int, repeats: int) -> dict:
    """Each kernel's median rate over `repeats` calls made while other processes left the cores (nearly)
    idle (bench_workers.measure: a disturbed call is discarded and made again once the machine is quiet)."""
    kernels = child_kernels(layers)
    from bench_workers import measure  # child_kernels put tools/ on sys.path

    def rate(fn, work):
        start = time.perf_counter()
        fn()
        return work / (time.perf_counter() - start)

    spec = {"repeats": repeats, "quiet_wait": 20.0}  # at most 20 s of waiting per process
    rates, other_cores, discarded = {}, {}, 0
    for name, (fn, work) in kernels.items():
        fn()  # compiled or loaded, pages faulted in
        result = measure(lambda: rate(fn, work), spec, name, UNITS[name])
        rates[name], other_cores[name] = result["median"], result["other_cores"]
        discarded += len(result["discarded"])
    return {"rates": rates, "other_cores": max(other_cores.values()), "discarded": discarded}


def innermost_loops(asm: str) -> list[list[str]]:
    """The instruction lines of each innermost loop: from a label to a jump back to it, with no such
    loop inside."""
    lines = asm.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\.LBB\d+_\d+:", line)}
    spans = []
    for i, line in enumerate(lines):
        jump = re.match(r"\s+j\w+\s+(\.LBB\d+_\d+)$", line)
        if jump and labels.get(jump.group(1), i) < i:
            spans.append((labels[jump.group(1)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[x for x in lines[a : b + 1] if x.startswith("\t") and not x.startswith("\t.")] for a, b in inner]


def widths(instructions: list[str]) -> tuple[int, int]:
    """(instructions on a zmm register, instructions on a ymm register and no zmm)."""
    return sum("zmm" in x for x in instructions), sum("ymm" in x and "zmm" not in x for x in instructions)


def arithmetic(instructions: list[str]) -> int:
    """Float32 vector adds, multiplies and fused multiply-adds: the work of a kernel's hot loop."""
    return sum(bool(re.match(r"\tv(fmadd\w*|add|mul)ps\s", x)) for x in instructions)


def child_asm() -> dict:
    """Per kernel: zmm and ymm instructions in its innermost loops, and in its hot loop (the one of most
    float32 arithmetic)."""
    import llvmlite.binding as ll
    from numba.core import config

    kernels = child_kernels(layers=1)
    for name in ("decode GEMVs", "bf16 read", "GEMM", "attention"):
        kernels[name][0]()
    from bench_workers import bf16_read_kernel

    from jitkernels.attention import _attend
    from jitkernels.matmul import _gemm, _gemv, _gemv_swiglu

    out = {"cpu": config.CPU_NAME or ll.get_host_cpu_name(), "kernels": {}}
    for name, dispatcher in [("_gemv (bf16 pairs)", _gemv), ("_gemv_swiglu", _gemv_swiglu),
                             ("bf16 read", bf16_read_kernel()), ("_gemm (bf16)", _gemm), ("_attend", _attend)]:
        loops = innermost_loops(dispatcher.inspect_asm(dispatcher.signatures[0]))
        hot = max(loops, key=arithmetic, default=[])
        out["kernels"][name] = {"zmm": sum(widths(x)[0] for x in loops), "ymm": sum(widths(x)[1] for x in loops),
                                "hot loop": (*widths(hot), arithmetic(hot), len(hot))}
    return out


# ---------------------------------------------------------------------------------------------------
# The parent: rounds of child processes

def run_child(variant: str, env: dict[str, str], cache: Path, args: list[str]) -> dict:
    full_env = {**os.environ, **env, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    command = [sys.executable, __file__, "--child", variant, *args]
    out = subprocess.run(command, env=full_env, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"error: variant {variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    a = parse_args()
    if a.child:
        if a.threads:
            import numba

            numba.set_num_threads(a.threads)
        if a.compile:
            for fn, _ in child_kernels(layers=1).values():
                fn()
            print("{}")
        else:
            print(json.dumps(child_asm() if a.asm else child_time(a.layers, a.repeats)))
        return
    import llvmlite.binding as ll

    print(f"# host: {ll.get_host_cpu_name()}; variants: {', '.join(variants())}", file=sys.stderr)
    if a.asm:
        for variant, env in asm_variants().items():
            with tempfile.TemporaryDirectory() as cache:
                result = run_child(variant, env, Path(cache), ["--asm"])
            print(f"{variant:7s} (LLVM cpu {result['cpu']})")
            for kernel, c in result["kernels"].items():
                print(f"  {kernel:20s} innermost loops: {c['zmm']:4d} zmm, {c['ymm']:4d} ymm instructions;"
                      f" hot loop {c['hot loop'][0]} zmm, {c['hot loop'][1]} ymm"
                      f" ({c['hot loop'][2]} float arithmetic of {c['hot loop'][3]})")
        return
    timing = ["--layers", str(a.layers), "--repeats", str(a.repeats), "--threads", str(a.threads)]
    caches = Path(tempfile.gettempdir()) / "qwen-ref-vector-width"  # kept: a rerun compiles nothing
    names = list(variants())
    for variant in names:  # compile outside the lock
        run_child(variant, variants()[variant], caches / variant, ["--compile"])
    rounds = []
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed: other timing runs go between rounds
            load = os.getloadavg()[0]
            results = {v: run_child(v, variants()[v], caches / v, timing) for v in order}
        rounds.append({"load1": load, "results": results})
        print(f"round {r + 1} (load {load:.2f}): " + "; ".join(
            f"{v} " + " ".join(f"{results[v]['rates'][k]:.1f}" for k in KERNELS) for v in order), file=sys.stderr)
    print(report(rounds, names, a))


def report(rounds: list[dict], names: list[str], a: argparse.Namespace) -> str:
    """Markdown: per kernel, each variant's median rate, and the median over rounds of its ratio to `host`."""
    lines = [f"{len(rounds)} rounds, loadavg(1 min) {min(r['load1'] for r in rounds):.2f}-"
             f"{max(r['load1'] for r in rounds):.2f}, {a.threads or 'all'} threads, {a.layers} layers", "",
             "| kernel | unit | " + " | ".join(names) + " | " + " | ".join(f"{v} / host" for v in names[1:]) + " |",
             "| --- | --- |" + " --- |" * (2 * len(names) - 1)]
    for k in KERNELS:
        med = [np.median([r["results"][v]["rates"][k] for r in rounds]) for v in names]
        ratios = [np.median([r["results"][v]["rates"][k] / r["results"]["host"]["rates"][k] for r in rounds])
                  for v in names[1:]]
        lines.append(f"| {k} | {UNITS[k]} | " + " | ".join(f"{m:.1f}" for m in med) + " | "
                     + " | ".join(f"{x:.3f}" for x in ratios) + " |")
    for v in names:
        gemm = np.median([r["results"][v]["rates"]["GEMM"] / r["results"][v]["rates"]["sgemm"] for r in rounds])
        gemv = np.median([r["results"][v]["rates"]["decode GEMVs"] / r["results"][v]["rates"]["stream"] for r in rounds])
        others = max(r["results"][v]["other_cores"] for r in rounds)
        discarded = sum(r["results"][v]["discarded"] for r in rounds)
        lines.append(f"\n{v}: GEMM / sgemm {gemm:.3f}, decode GEMVs / stream {gemv:.3f}; other processes' cores"
                     f" while timing at most {others:.2f}, {discarded} disturbed calls made again")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--asm", action="store_true", help="count zmm and ymm instructions instead of timing")
    ap.add_argument("--rounds", type=int, default=8, help="rounds, each running every variant once")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls of each kernel in a process")
    ap.add_argument("--layers", type=int, default=24, help="0.5B-shape layers of bfloat16 weights in the decode")
    ap.add_argument("--threads", type=int, default=0, help="Numba threads (0: Numba's default, every core)")
    ap.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds < 1 or a.repeats < 1 or a.layers < 1:
        ap.error("--rounds, --repeats and --layers must be at least 1")
    return a


if __name__ == "__main__":
    main()
