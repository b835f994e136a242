"""One cell of `qwen-ref needle` at 32K on the Qwen1.5-0.5B shape: wall time and peak resident memory.

    python tools/bench_needle_32k.py [--model DIR] [--context 32768] [--depth 50] [--md benchmarks/needle_32k.md]

The model defaults to benchmarks/checkpoints/qwen1.5-0.5b-bfloat16, written by tools/make_checkpoint.py
(random weights, the published shape, the Qwen1.5 tokenizer and chat template) when missing. The cell runs
in a child process (this tree's qwen_ref) whose own peak RSS comes from wait4; the Markdown file records
the command, the host (lscpu model name, cores, memory), the date, the cell's scores and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref, whatever is installed

from qwen_ref.config import load_config  # noqa: E402
from qwen_ref.kv_cache import kv_bytes_per_token  # noqa: E402
from qwen_ref.needle import MAX_NEW_TOKENS  # noqa: E402

DEFAULT_MODEL = REPO / "benchmarks" / "checkpoints" / "qwen1.5-0.5b-bfloat16"


def host() -> str:
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "unknown CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores available, {memory:.1f} GiB, {platform.platform()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="(default: %(default)s)")
    parser.add_argument("--context", type=int, default=32768, help="(default: %(default)s)")
    parser.add_argument("--depth", type=float, default=50, help="(default: %(default)s)")
    parser.add_argument("--md", type=Path, default=REPO / "benchmarks" / "needle_32k.md", help="(default: %(default)s)")
    args = parser.parse_args()

    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), "--shape", "0.5b", "--dtype",
                        "bfloat16", "--out", str(args.model)], check=True)
    config = load_config(args.model)
    weights = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    kv = kv_bytes_per_token(config) * (args.context + MAX_NEW_TOKENS)  # the cache run_context allocates, at most

    with tempfile.TemporaryDirectory() as out:
        command = ["qwen-ref", "needle", "--model", str(args.model), "--contexts", str(args.context),
                   "--depths", f"{args.depth:g}", "--out", out, "--no-plot"]
        started = time.perf_counter()
        # stderr (the prefill bar, the cell's line) goes to the terminal; stdout is the grid
        child = subprocess.Popen([sys.executable, "-m", "qwen_ref", *command[1:]], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        grid = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        cells = json.loads((Path(out) / "needle.json").read_text())["cells"] if code == 0 else []

    peak = usage.ru_maxrss * 1024  # kB on Linux
    budget = weights + kv + 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        f"# `qwen-ref needle` at {args.context} tokens on the Qwen1.5-0.5B shape",
        "",
        (f"`python tools/bench_needle_32k.py --context {args.context} --depth {args.depth:g}` ran, on "
         f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC at {commit}'s code:"),
        "",
        f"    {shlex.join(command[:-3])} --out OUT --no-plot",
        "",
        (f"Host: {host()}. Checkpoint: {args.model.name} (random weights from tools/make_checkpoint.py, so the "
         "scores say nothing of retrieval: the run measures time and memory). numba backend, float32 KV cache, "
         "--prefill-chunk 512, defaults otherwise."),
        "",
        "| context | depth | exit | wall | cell | peak RSS | budget: weights + KV cache + 1 GiB |",
        "|---|---|---|---|---|---|---|",
        f"| {args.context} | {args.depth:g}% | {code} | {int(wall // 60)} min {int(wall % 60)} s | "
        + (f"{cells[0]['seconds']:.0f} s" if cells else "-")
        + f" | {peak / 1e9:.2f} GB | {weights / 1e9:.2f} + {kv / 1e9:.2f} + {2**30 / 1e9:.2f} = "
        + f"{budget / 1e9:.2f} GB |",
        "",
        ("wall: the whole command (load, checkpoint hash, tokenizing, the kernels' first compile if the cache is "
         "cold, the cell); cell: prefill, the forced answer and the greedy answer (up to "
         f"{MAX_NEW_TOKENS} tokens) of the one prompt. Peak RSS: the child process's own (wait4)."),
    ]
    if cells:
        c = cells[0]
        lines += ["", (f"The cell: needle at token {c['needle_token']} of {c['prompt_tokens']} "
                       f"({c['needle_depth']:.1f}% of the haystack), exact {int(c['exact'])}, answer log p "
                       f"{c['answer_logprob_sum']:.2f} nats over {len(c['answer_logprobs'])} tokens."), "",
                  "stdout:", "", *("    " + line for line in grid.splitlines())]
    args.md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.md}: exit {code}, wall {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
