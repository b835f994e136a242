"""llama.cpp beside qwen-ref on this machine: decode tokens/s of the same random-weight checkpoint, each as a
fraction of the streaming-read ceiling measured around them, round after round (as tools/bench.py's paired
rounds). It shows how close a mature engine comes to the ceiling that tools/bench.py judges qwen-ref by.

llama.cpp is not a dependency of qwen-ref: build its llama-bench and convert the checkpoints first, for
example from the llama-cpp-python sdist (`pip download llama-cpp-python --no-deps --no-binary :all:`), in
its vendor/llama.cpp (the converter needs gguf-py on PYTHONPATH, torch and sentencepiece):

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-bench -j2
    python convert_hf_to_gguf.py <repo>/benchmarks/checkpoints/qwen1.5-0.5b-bfloat16 --outtype bf16 --outfile q05-bf16.gguf
    python convert_hf_to_gguf.py <repo>/benchmarks/checkpoints/qwen1.5-0.5b-bfloat16 --outtype f32 --outfile q05-f32.gguf

then

    python tools/bench_llamacpp.py --llama-bench build/bin/llama-bench --gguf bf16=q05-bf16.gguf --gguf f32=q05-f32.gguf

Each round: a streaming read, then per storage llama-bench (64 tokens generated after 128 in the cache, as
tools/bench.py's decode) and qwen-ref's decode of the checkpoint in that storage, then a streaming read.
Writes benchmarks/llamacpp.json and benchmarks/llamacpp.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench import REPO, machine_info, run_workload
from bench_figures import ITEMSIZE, decode_bytes, model_facts
from bench_plan import DTYPES, Plan, Workload, _bandwidth, _decode, checkpoint_name

PLAN = Plan()
MEAN_KEYS = PLAN.prompt + 1 + (PLAN.new_tokens - 2) / 2  # bench_figures.mean_keys of a 64-token decode after 128


def evict(path: Path) -> None:
    """Drop a file from the page cache, so that it is read again from disk (in large folios, as the bench's
    checkpoints are) rather than kept in the 4 KB pages its writing left."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def llama_decode(llama_bench: Path, gguf: Path, threads: int) -> dict:
    """llama-bench generating PLAN.new_tokens tokens after PLAN.prompt in the cache (3 repeats): its JSON
    record, with `avg_ts` the mean tokens/s and the build and model it ran."""
    args = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-r", "3", "-o", "json",
            "-p", "0", "-n", str(PLAN.new_tokens), "-d", str(PLAN.prompt)]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    (result,) = json.loads(run.stdout)
    return result


def run(w: Workload) -> list[dict]:
    """tools/bench.py's worker subprocess for one workload, with the bench's wait for a quiet machine."""
    w.spec["quiet_wait"] = PLAN.quiet_wait
    return run_workload(w)


def stream_read(threads: int) -> float:
    """The bench's streaming read of a 1 GiB anonymous array, GB/s (median of its repeats)."""
    (read,) = [m for m in run(_bandwidth(PLAN, threads, "llamacpp", "bandwidth", mmap_file=""))
               if m["name"].endswith(f"/anon/{threads}t")]
    return read["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", type=Path, required=True)
    ap.add_argument("--gguf", action="append", required=True, metavar="STORAGE=PATH",
                    help="bf16=q05-bf16.gguf: a GGUF of the 0.5B checkpoint in that storage (bf16, f16 or f32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--checkpoints", type=Path, default=REPO / "benchmarks" / "checkpoints")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "llamacpp.json")
    a = ap.parse_args()
    ggufs = dict(item.split("=", 1) for item in a.gguf)
    if not a.llama_bench.is_file() or any(s not in DTYPES or not Path(p).is_file() for s, p in ggufs.items()):
        sys.exit("error: --llama-bench must be a file, and each --gguf STORAGE=PATH an existing file with "
                 f"STORAGE one of {', '.join(DTYPES)}")
    facts = model_facts(a.checkpoints / checkpoint_name("0.5b", "bf16"))
    for path in ggufs.values():
        evict(Path(path))

    rounds, builds = [], {}
    for r in range(1, a.rounds + 1):
        row = {"round": r, "read_before": stream_read(a.threads)}
        for storage, path in ggufs.items():
            theirs = llama_decode(a.llama_bench, Path(path), a.threads)
            builds[storage] = {k: theirs.get(k) for k in ("build_commit", "model_type", "type_k", "type_v")}
            ours = _decode(f"llamacpp/qwen-ref/{storage}", "qwen_decode", str(a.checkpoints / checkpoint_name("0.5b", storage)),
                           a.threads, PLAN, backend="numba", new_tokens=PLAN.new_tokens)
            row[storage] = {"llama.cpp": float(theirs["avg_ts"]), "qwen-ref": run(ours)[0]["median"]}
        row["read_after"] = stream_read(a.threads)
        rounds.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    lines = ["| storage | engine | bytes/token | tokens/s by round | of ceiling by round | median of ceiling |",
             "|---|---|---|---|---|---|"]
    for storage in ggufs:
        for engine, cache_itemsize in (("llama.cpp", 2), ("qwen-ref", 4)):  # llama.cpp keeps its KV cache in f16
            per_token = decode_bytes(facts, ITEMSIZE[storage], cache_itemsize, MEAN_KEYS)["total"]
            fractions = [x[storage][engine] * per_token / (max(x["read_before"], x["read_after"]) * 1e9) for x in rounds]
            lines.append(f"| {storage} | {engine} | {per_token / 1e9:.3f} GB | "
                         + " / ".join(f"{x[storage][engine]:.1f}" for x in rounds) + " | "
                         + " / ".join(f"{f:.0%}" for f in fractions) + f" | {np.median(fractions):.0%} |")
    reads = " / ".join(f"{x['read_before']:.1f}-{x['read_after']:.1f}" for x in rounds)
    command = " ".join(["python", "tools/bench_llamacpp.py", *sys.argv[1:]])
    machine = machine_info()
    text = [f"# llama.cpp beside qwen-ref ({time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads)", "",
            f"`{command}` on {machine.get('cpu_model', 'this machine')}; llama.cpp "
            + ", ".join(f"{s}: {b['model_type']}, build {b['build_commit']}, KV cache {b['type_k']}" for s, b in builds.items())
            + ". Decode of the random-weight Qwen1.5-0.5B checkpoint (tied), 64 tokens after 128 in the cache; "
            "ceiling = the higher of the streaming reads before and after the round (tools/bench.py's `anon` read, "
            f"GB/s by round: {reads}) over the bytes a step reads.", "", *lines, ""]
    print("\n".join(text))
    a.out.write_text(json.dumps({"command": command, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "machine": machine, "threads": a.threads, "llama_cpp": builds, "rounds": rounds},
                                indent=1) + "\n")
    a.out.with_suffix(".md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
