"""Wall time of `qwen-ref suite make` on 64 prompts: in one process against a local 2-worker dask cluster.

    python tools/bench_suite_wall_time.py [--repeats 3] [--out benchmarks/suite_wall_time.md]

The model is the full-vocabulary test fixture (hidden 8, Qwen's 151,936-token vocabulary, bf16) with the
real Qwen1.5 tokenizer from tests/data; the prompts are 64 chat cases of a few dozen tokens. Each run is
the whole command as a user runs it (process start, model load, cluster start and stop, every case)
into a fresh folder; local and 2-worker runs alternate, and every run's files must equal the first's.
Other processes' CPU use during each run (from /proc/stat, less this run's own) is recorded beside it:
on a shared machine it is what makes two medians comparable or not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import lzma
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "full_vocab_bf16"
TOKENIZER = REPO / "tests" / "data" / "qwen1.5-tokenizer"


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _model(root: Path) -> Path:
    model = root / "model"
    shutil.copytree(FIXTURE, model)
    (model / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER / "tokenizer.json.xz").read_bytes()))
    shutil.copyfile(TOKENIZER / "tokenizer_config.json", model / "tokenizer_config.json")
    return model


def _prompts(root: Path) -> Path:
    path = root / "prompts.jsonl"
    lines = [json.dumps({"id": f"q{i:02d}", "text": f"Question {i}: what is {i} times {i + 3}, and why is the answer "
                                                  f"{'even' if i * (i + 3) % 2 == 0 else 'odd'}? Explain briefly.",
                         "chat": True}) for i in range(64)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(command: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, cores other processes kept busy meanwhile, seconds until the dask workers held the
    model, if a cluster ran) of one command."""
    tick = os.sysconf("SC_CLK_TCK")
    busy0, own0, t0 = _busy_jiffies(), _children_cpu(), time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    others = (_busy_jiffies() - busy0) / tick - (_children_cpu() - own0)
    ready = re.search(r"dask: \d+ workers have loaded the model in ([0-9.]+) s", done.stderr)
    return wall, max(0.0, others) / wall, float(ready.group(1)) if ready else None


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "suite_wall_time.md")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="suite-bench-"))
    model, prompts = _model(root), _prompts(root)
    setups = {"local": [], "--workers 2": ["--workers", "2"]}
    base = [sys.executable, "-m", "qwen_ref", "suite", "make", "--model", str(model), str(prompts)]
    _run(base + ["--out", str(root / "warm")])  # compiles the kernels, if this machine has not yet
    first = _files(root / "warm")
    n_tokens = [c["n_tokens"] for c in json.loads((root / "warm" / "manifest.json").read_text())["cases"]]
    runs: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in setups}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for name, flags in setups.items():
            out = root / f"{name.strip('-').replace(' ', '')}-{r}"
            runs[name].append(_run(base + ["--out", str(out), *flags]))
            if _files(out) != first:
                sys.exit(f"{name} run {r} wrote other files than the first run")
    load_after = os.getloadavg()
    shutil.rmtree(root)

    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "unknown")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True).stdout.strip()
    medians = {name: statistics.median(w for w, _, _ in r) for name, r in runs.items()}
    lines = [
        "# Wall time of `qwen-ref suite make`: local against a 2-worker dask cluster",
        "",
        (f"`python tools/bench_suite_wall_time.py --repeats {args.repeats}`, "
         f"{datetime.datetime.now().isoformat(timespec='minutes')} at {commit}; host: {cpu}, "
         f"{os.cpu_count()} cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after."),
        "",
        (f"64 chat prompts of {min(n_tokens)}-{max(n_tokens)} tokens ({sum(n_tokens)} in all) on the "
         "full-vocabulary fixture (hidden 8, vocabulary 151,936, bf16, real Qwen1.5 tokenizer). Each run is "
         "the whole command (process start, model load, cluster start and stop, all 64 cases) into a fresh "
         "folder; the two setups alternate; every run wrote the same bytes as the first. 'others' is the "
         "CPU other processes used during the run, in cores; 'ready' is when the dask workers held the model."),
        "",
        "| setup | " + " | ".join(f"run {i + 1}" for i in range(args.repeats)) + " | median |",
        "|---|" + "---|" * (args.repeats + 1),
    ]
    for name, r in runs.items():
        cells = " | ".join(f"{w:.2f} s (others {o:.2f}" + ("" if c is None else f", ready {c:.2f} s") + ")"
                           for w, o, c in r)
        lines.append(f"| {name} | {cells} | **{medians[name]:.2f} s** |")
    lines += ["", f"2 workers / local: {medians['--workers 2'] / medians['local']:.2f}x the wall time.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
