"""Prefill with each prefill GEMM (`--kernels`) beside transformers float32 and the float32 sgemm ceiling.

    python tools/bench_prefill_paths.py                      # 0.5B shape bf16, 128 and 512 tokens, 5 rounds
    python tools/bench_prefill_paths.py --rounds 3 --prompts 128

Each round runs, for each prompt length, in fresh worker processes (`tools/bench.py --worker`, so no
thread pool outlives its workload) and in an order that rotates from round to round: qwen-ref with
QWEN_REF_KERNELS=numba-gemm, with blas-gemm, transformers float32 (sdpa, the default), and NumPy's
float32 sgemm on the seven products of one layer (the ceiling). Each worker reports the median of
--repeats prompts (logits of the last position only, as generation needs). The ratios are taken
round by round, then their median; tokens/s and GFLOP/s are medians over rounds. The checkpoint is
warm (every worker reads it right after the previous one). Writes a markdown table with the
command, the host (lscpu model name and SIMD flags) and the load (uptime, and the other processes'
CPU use that each worker measured) to --out (default: benchmarks/hosts/<this host>/prefill_paths.md,
the host as tools/bench.py names it), and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from bench import machine_info
from bench_figures import model_facts, prefill_flops_per_token

PATHS = ("numba-gemm", "blas-gemm")
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni",
         "amx_bf16", "amx_tile")


def lscpu() -> tuple[str, list[str]]:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    have = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.processor()), [f for f in FLAGS if f in have]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def worker(spec: dict, env: dict | None = None) -> dict:
    """One workload in a fresh process; its first measurement."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--worker", json.dumps(spec)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                         cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['kind']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["measurements"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "benchmarks" / "checkpoints" / "qwen1.5-0.5b-bfloat16",
                        help="checkpoint folder (default: %(default)s; tools/make_checkpoint.py makes it)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prompts per worker (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="(default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="markdown file to write (default: benchmarks/hosts/<this host>/prefill_paths.md)")
    args = parser.parse_args()
    args.out = args.out or REPO / "benchmarks" / "hosts" / machine_info()["slug"] / "prefill_paths.md"

    facts = model_facts(args.model)
    common = {"threads": args.threads, "repeats": args.repeats, "quiet_wait": 0.0}
    model_dir = str(args.model)
    loads = [uptime()]
    rows: dict[int, dict[str, list]] = {}
    for r in range(args.rounds):
        for prompt in args.prompts:
            runs = {f"qwen-ref {p}": ({**common, "kind": "qwen_prefill", "backend": "numba", "model_dir": model_dir,
                                       "prompt": prompt}, {"QWEN_REF_KERNELS": p}) for p in PATHS}
            runs["transformers float32"] = ({**common, "kind": "hf_prefill", "model_dir": model_dir, "prompt": prompt,
                                             "torch_dtype": "float32"}, None)
            runs["sgemm ceiling"] = ({**common, "kind": "gemm", "prefix": "ceiling", "label": "gemm",
                                      "shapes": {"0.5b": model_dir}, "prompts": [prompt]}, None)
            names = list(runs)
            order = names[r % len(names):] + names[: r % len(names)]
            got = rows.setdefault(prompt, {n: [] for n in names} | {"other cores": []})
            for name in order:
                m = worker(*runs[name])
                got[name].append(m["median"])
                got["other cores"].append(m.get("other_cores", 0.0))
                print(f"round {r + 1} T={prompt} {name}: {m['median']:.1f} {m['unit']} "
                      f"(others {m.get('other_cores', 0):.2f} cores)", file=sys.stderr, flush=True)
        loads.append(uptime())

    model, flags = lscpu()
    lines = [
        f"# Prefill GEMM paths on {model}",
        "",
        f"Command: `python tools/bench_prefill_paths.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}).",
        f"Host: {model}, {os.cpu_count()} CPUs, {args.threads} threads; flags: {', '.join(flags)}; "
        f"LLVM CPU name {_llvm_cpu()}.",
        f"Load (uptime) before, after each round: {' | '.join(s.split('load average:')[-1].strip() for s in loads)}.",
        f"Checkpoint: {args.model.name} (warm). {args.rounds} rounds, order rotating; each figure the median of "
        f"{args.repeats} prompts in a fresh process; below, the median over rounds (min-max).",
        "",
        "| prompt | path | tokens/s | x transformers f32 | of sgemm ceiling | x numba-gemm |",
        "|---|---|---|---|---|---|",
    ]
    for prompt, got in rows.items():
        flops = prefill_flops_per_token(facts, prompt) / 1e9  # GFLOP per token
        ceiling = np.array(got["sgemm ceiling"]) / flops  # tokens/s the ceiling would allow, per round
        hf = np.array(got["transformers float32"])
        base = np.array(got["qwen-ref numba-gemm"])
        for name in (*[f"qwen-ref {p}" for p in PATHS], "transformers float32"):
            v = np.array(got[name])
            lines.append(f"| {prompt} | {name} | {np.median(v):.1f} ({v.min():.1f}-{v.max():.1f}) | "
                         f"{np.median(v / hf):.2f}x | {np.median(v / ceiling):.0%} | {np.median(v / base):.2f}x |")
        g = np.array(got["sgemm ceiling"])
        lines.append(f"| {prompt} | sgemm ceiling: {np.median(g):.0f} GFLOP/s ({g.min():.0f}-{g.max():.0f}), "
                     f"{flops:.3f} GFLOP/token | {np.median(ceiling):.1f} | | | |")
        lines.append(f"| {prompt} | other processes, cores busy (median, max) | {np.median(got['other cores']):.2f}, "
                     f"{max(got['other cores']):.2f} | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def _llvm_cpu() -> str:
    import llvmlite.binding

    return llvmlite.binding.get_host_cpu_name()


if __name__ == "__main__":
    main()
