"""Long-prompt attention against the sgemm ceiling: where a long prefill's time goes, and old against new.

    python tools/bench_attention.py                          # 0.5B shape: chunks of 512 over 4K-31K
    python tools/bench_attention.py --against main           # the same, alternating with main's kernels
    python tools/bench_attention.py --decode --against main  # decode steps, hd 64/128, G 1/5
    python tools/bench_attention.py --estimate 32000         # sum the chunks of a 32,000-token prompt

Prefill reports, per chunk of T queries over a cache of S positions: attention in GFLOP/s, counting
4 H hd per (query, key) pair the causal mask keeps; the projections of one layer (q, k, v, o, gate,
up, down, bfloat16 weights, the host's chosen GEMM) in GFLOP/s; and NumPy's float32 sgemm on
[2048, 2048] @ [2048, 2048], the ceiling. `--against REF` loads REF's jitkernels from git as a second
package and times the two alternately in this process (medians; ratio = old / new time). Run timings
under `flock /tmp/qwen-ref-measure.lock` on a shared machine. Results on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jitkernels  # noqa: E402

LAYERS, HIDDEN, FFN = 24, 1024, 2816  # Qwen1.5-0.5B


def kernels_at(ref: str) -> object:
    """jitkernels as of git `ref`, imported as a package of another name (its own kernel cache)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    name = f"jitkernels_{sha}"
    root = Path(tempfile.gettempdir()) / f"bench-attention-{sha}"
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{ref}:jitkernels"], check=True,
                           capture_output=True, text=True).stdout.split()
    for file in (f for f in files if f.endswith(".py")):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:jitkernels/{file}"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from jitkernels import", f"from {name} import").replace("jitkernels.", f"{name}.")
        target = package / file
        if not target.exists() or target.read_text() != text:  # unchanged files keep Numba's cache valid
            target.write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def timed(fn, repeats: int, others=()) -> list[list[float]]:
    """Seconds per call of fn and each of others, alternating (order swapped every round), after a warm-up."""
    fns = [fn, *others]
    for f in fns:
        f()
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def line(name: str, times: list[list[float]], flops: float) -> None:
    new = float(np.median(times[0]))
    text = f"{name:44s} new {new * 1e3:9.2f} ms {flops / new / 1e9:7.1f} GFLOP/s"
    if len(times) > 1:
        old = float(np.median(times[1]))
        ratio = float(np.median(np.array(times[1]) / np.array(times[0])))
        text += f" | old {old * 1e3:9.2f} ms {flops / old / 1e9:7.1f} GFLOP/s | old/new {old / new:.2f}x" \
                f" (paired median {ratio:.2f}x)"
    print(text, flush=True)


def causal_pairs(T: int, S: int) -> int:
    """(query, key) pairs that T queries, the last T of S positions, see."""
    return T * (S - T) + T * (T + 1) // 2


def cache(rng, Hkv: int, S: int, hd: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    kv = rng.standard_normal((2, Hkv, S + 64, hd), dtype=np.float32)  # [2, Hkv, capacity, hd]
    if dtype == "bfloat16":
        kv = (kv.view(np.uint32) >> 16).astype(np.uint16)
    elif dtype == "float16":
        kv = kv.astype(np.float16)
    return kv[0], kv[1]


def sgemm_ceiling(repeats: int) -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    times = timed(lambda: a @ a, repeats)
    rate = 2 * 2048**3 / float(np.median(times[0])) / 1e9
    print(f"{'numpy sgemm [2048,2048]@[2048,2048]':44s} {rate:7.1f} GFLOP/s (the ceiling)", flush=True)
    time.sleep(0.5)  # let OpenBLAS's threads sleep before Numba's run
    return rate


def projections(repeats: int, gemm: str) -> float:
    """Seconds for one layer's projections of a 512-token chunk; prints the rate."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, HIDDEN), dtype=np.float32)
    xf = rng.standard_normal((512, FFN), dtype=np.float32)

    def bf16(shape):
        return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)

    wq, wk, wv, wo = (bf16((HIDDEN, HIDDEN)) for _ in range(4))
    wg, wu, wd = bf16((FFN, HIDDEN)), bf16((FFN, HIDDEN)), bf16((HIDDEN, FFN))

    def layer():
        jitkernels.linears(x, (wq, wk, wv), (None, None, None), gemm)
        jitkernels.linear(x, wo, None, gemm)
        jitkernels.swiglu(x, wg, wu, gemm)
        jitkernels.linear(xf, wd, None, gemm)

    times = timed(layer, repeats)
    flops = 2 * 512 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN)
    line(f"projections of a layer, T=512 ({gemm} GEMM)", times, flops)
    return float(np.median(times[0]))


def prefill(args, old, gemm: str) -> dict[int, float]:
    """Attention seconds per chunk of args.chunk queries at each context; prints the rates."""
    rng = np.random.default_rng(0)
    T, H, Hkv, hd = args.chunk, args.heads, args.kv_heads, args.head_dim
    seconds = {}
    for S in args.contexts:
        k, v = cache(rng, Hkv, S, hd, args.kv_dtype)
        q = rng.standard_normal((T, H, hd), dtype=np.float32)
        others = [lambda: old.attention(q, k, v, S)] if old else []
        times = timed(lambda: jitkernels.attention(q, k, v, S, gemm), args.repeats, others)
        line(f"attention T={T} S={S} H={H} Hkv={Hkv} hd={hd} {args.kv_dtype} ({gemm})", times,
             4 * H * hd * causal_pairs(T, S))
        seconds[S] = float(np.median(times[0]))
    return seconds


def decode(args, old, gemm: str) -> None:
    rng = np.random.default_rng(2)
    for S in (4096, 16384):
        for hd in (64, 128):
            for Hkv, G in ((16, 1), (8, 5)):
                k, v = cache(rng, Hkv, S, hd, args.kv_dtype)
                q = rng.standard_normal((1, Hkv * G, hd), dtype=np.float32)
                others = [lambda: old.attention(q, k, v, S)] if old else []
                times = timed(lambda: jitkernels.attention(q, k, v, S, gemm), 10 * args.repeats, others)
                line(f"decode S={S} Hkv={Hkv} G={G} hd={hd} {args.kv_dtype}", times, 4 * Hkv * G * hd * S)


def estimate(args, seconds: dict[int, float], layer_projections: float, ceiling: float) -> None:
    """The prompt's prefill from the chunks: attention fitted as a + b * pairs, projections per token."""
    T, H, hd = args.chunk, args.heads, args.head_dim
    contexts = sorted(seconds)
    b, a = np.polyfit([causal_pairs(T, S) for S in contexts], [seconds[S] for S in contexts], 1)
    attention_s = projection_s = attention_flops = 0.0
    for start in range(0, args.estimate, T):
        n, S = min(T, args.estimate - start), min(start + T, args.estimate)
        attention_s += LAYERS * (a + b * causal_pairs(n, S))
        projection_s += LAYERS * layer_projections * n / 512
        attention_flops += LAYERS * 4 * H * hd * causal_pairs(n, S)
    projection_flops = LAYERS * 2 * args.estimate * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN)
    total = attention_s + projection_s
    ideal = (attention_flops + projection_flops) / (ceiling * 1e9)
    print(f"estimate {args.estimate} tokens: attention {attention_s:.0f} s ({attention_flops / 1e12:.1f} TFLOP), "
          f"projections {projection_s:.0f} s ({projection_flops / 1e12:.1f} TFLOP), total {total:.0f} s, "
          f"{ideal / total:.0%} of the sgemm ceiling ({ideal:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 31744], help="cache positions S")
    parser.add_argument("--chunk", type=int, default=512, help="queries per prefill chunk")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each kernel")
    parser.add_argument("--kernels", choices=jitkernels.KERNEL_CHOICES, default="auto",
                        help="the prefill GEMM of projections and attention (jitkernels.choose_gemm)")
    parser.add_argument("--against", metavar="REF", help="also time REF's jitkernels, alternating")
    parser.add_argument("--decode", action="store_true", help="decode steps instead of prefill chunks")
    parser.add_argument("--estimate", type=int, metavar="TOKENS", help="estimate a whole prompt's prefill")
    args = parser.parse_args()
    old = kernels_at(args.against) if args.against else None
    gemm = jitkernels.choose_gemm(args.kernels).gemm
    if args.decode:
        decode(args, old, gemm)
        return
    ceiling = sgemm_ceiling(args.repeats)
    layer_projections = projections(args.repeats, gemm)
    seconds = prefill(args, old, gemm)
    if args.estimate:
        estimate(args, seconds, layer_projections, ceiling)


if __name__ == "__main__":
    main()
