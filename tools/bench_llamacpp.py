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
tools/bench.py's decode; and with --prefill, prompts of 128 and 512 tokens) and qwen-ref's decode (and
prefills) of the checkpoint in that storage, in alternating order from round to round, each after waiting
for a quiet machine, then a streaming read. The ceiling reads are
separate workloads, like the paired rounds' "a minute apart" columns, not read in the decode's process.
(llama.cpp maps its GGUF in 2 MB pages here too: FilePmdMapped 827 MB of 928 during a bf16 run.)
Writes benchmarks/hosts/<host>/llamacpp.json (after every round) and llamacpp.md (the table, also printed),
and the bf16 medians of qwen-ref / llama.cpp into that host's results.json, whose targets name them
(then remakes the host pages and the index, as tools/bench.py --report).
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
from bench import (
    REPO,
    drop_file_from_page_cache,
    ensure_checkpoint,
    machine_info,
    report_only,
    run_workload,
)
from bench_figures import ITEMSIZE, decode_bytes, mean_keys, model_facts
from bench_plan import DTYPES, Plan, Workload, _bandwidth, _decode, _prefill
from bench_workers import CpuLoad, wait_for_quiet

PLAN = Plan()
ENGINES = ("llama.cpp", "qwen-ref")


def main() -> None:
    a = parse_args()
    ggufs = parse_ggufs(a.gguf)
    if not a.llama_bench.is_file():
        sys.exit(f"error: --llama-bench {a.llama_bench} is not a file")
    if a.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    checkpoints = {storage: ensure_checkpoint(a.checkpoints, "0.5b", storage) for storage in ggufs}
    for path in ggufs.values():  # a GGUF just written sits in 4 KB pages: read from disk, llama.cpp maps 2 MB ones
        drop_file_from_page_cache(path)
    facts = model_facts(checkpoints[next(iter(ggufs))])
    machine = machine_info()
    out = a.out or REPO / "benchmarks" / "hosts" / machine["slug"] / "llamacpp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {"command": " ".join(["python", "tools/bench_llamacpp.py", *sys.argv[1:]]), "machine": machine,
            "threads": a.threads, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "llama_cpp": {}, "rounds": []}
    for r in range(1, a.rounds + 1):
        runs["rounds"].append(measure_round(r, a, ggufs, checkpoints, runs["llama_cpp"]))
        runs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        out.write_text(json.dumps(runs, indent=1) + "\n")  # after every round: an interrupted run keeps them
    text = report(runs, facts, list(ggufs))
    print(text)
    out.with_suffix(".md").write_text(text)
    host_results = out.parent / "results.json"
    if "bf16" in ggufs and host_results.is_file() and out.parent.parent.name == "hosts":
        results = json.loads(host_results.read_text())
        results["llamacpp"] = {**ratios(runs["rounds"], "bf16"), "measured": runs["finished"][:10],
                               "source": f"{out.with_suffix('.md').name}: bf16, medians over the rounds of "
                                         "qwen-ref / llama.cpp tokens/s"}
        host_results.write_text(json.dumps(results, indent=1) + "\n")
        report_only(out.parent.parent.parent)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--llama-bench", type=Path, required=True, help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", action="append", required=True, metavar="STORAGE=PATH",
                    help="bf16=q05-bf16.gguf: a GGUF of the 0.5B checkpoint in that storage (bf16, f16 or f32)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of reads and decodes")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of both engines")
    ap.add_argument("--checkpoints", type=Path, default=REPO / "benchmarks" / "checkpoints",
                    help="where tools/bench.py keeps (or makes) its checkpoints")
    ap.add_argument("--prefill", action="store_true", help="also prompts of 128 and 512 tokens (llama-bench -p)")
    ap.add_argument("--out", type=Path,
                    help="results; the table goes beside it as .md (default: benchmarks/hosts/<this host>/llamacpp.json)")
    return ap.parse_args()


def parse_ggufs(items: list[str]) -> dict[str, Path]:
    """{storage: GGUF path} from STORAGE=PATH arguments, or a one-line error."""
    ggufs = {}
    for item in items:
        storage, _, path = item.partition("=")
        if storage not in DTYPES or not Path(path).is_file():
            sys.exit(f"error: --gguf {item}: expected STORAGE=PATH with STORAGE one of {', '.join(DTYPES)} "
                     "and PATH an existing file")
        ggufs[storage] = Path(path)
    return ggufs


def measure_round(r: int, a: argparse.Namespace, ggufs: dict[str, Path], checkpoints: dict[str, Path],
                  builds: dict) -> dict:
    """A streaming read, both engines on every storage (llama.cpp first in odd rounds), a streaming read."""
    row = {"round": r, "read_before": stream_read(a.threads)}
    for storage, gguf in ggufs.items():
        row[storage] = {}
        for engine in (ENGINES if r % 2 else ENGINES[::-1]):
            if engine == "llama.cpp":
                row[storage][engine], builds[storage] = llama_decode(a.llama_bench, gguf, a.threads)
                if a.prefill:
                    row[storage]["prefill"] = {**row[storage].get("prefill", {}),
                                               engine: llama_prefill(a.llama_bench, gguf, a.threads)}
            else:
                row[storage][engine] = qwen_decode(checkpoints[storage], a.threads)
                if a.prefill:
                    row[storage]["prefill"] = {**row[storage].get("prefill", {}),
                                               engine: qwen_prefill(checkpoints[storage], a.threads)}
    row["read_after"] = stream_read(a.threads)
    print(json.dumps(row)[:400], file=sys.stderr, flush=True)
    return row


def run(w: Workload) -> dict:
    """tools/bench.py's worker subprocess for one workload (its first measurement), or a one-line error."""
    w.spec["quiet_wait"] = PLAN.quiet_wait
    m = run_workload(w)[0]
    if "error" in m:
        sys.exit(f"error: {w.name}: {m['error']}")
    return m


def stream_read(threads: int) -> float:
    """The bench's streaming read of a 1 GiB anonymous array, GB/s (median of its repeats)."""
    return run(_bandwidth(PLAN, threads, "llamacpp", "bandwidth", mmap_file=""))["median"]


def qwen_decode(checkpoint: Path, threads: int) -> dict:
    """tools/bench.py's decode workload: tokens/s of 63 steps after a 128-token prompt, median of repeats."""
    m = run(_decode(f"llamacpp/qwen-ref/{checkpoint.name}", "qwen_decode", str(checkpoint), threads, PLAN,
                    backend="numba", new_tokens=PLAN.new_tokens))
    return {"tokens_s": m["median"], "values": m["values"], "other_cores": m["other_cores"],
            "mean_keys": mean_keys(m)}


def qwen_prefill(checkpoint: Path, threads: int) -> dict[str, float]:
    """tools/bench.py's prefill workload at each of PLAN.prefill_prompts: {"prefill-P": tokens/s, median of repeats}."""
    return {f"prefill-{P}": run(_prefill(f"llamacpp/qwen-ref/{checkpoint.name}/prefill-{P}", "qwen_prefill",
                                         str(checkpoint), threads, PLAN, P, backend="numba"))["median"]
            for P in PLAN.prefill_prompts}


def llama_prefill(llama_bench: Path, gguf: Path, threads: int) -> dict[str, float]:
    """llama-bench's prompt processing of PLAN.prefill_prompts tokens, 3 repeats each, after waiting for a quiet
    machine: {"prefill-P": tokens/s, median of the repeats}."""
    wait_for_quiet(PLAN.quiet_wait)
    results = _llama_bench(llama_bench, ["-m", str(gguf), "-t", str(threads), "-r", "3", "-o", "json", "-n", "0",
                                         "-p", ",".join(str(P) for P in PLAN.prefill_prompts)])[0]
    return {f"prefill-{x['n_prompt']}": float(np.median(x["samples_ts"])) for x in results}


def _llama_bench(llama_bench: Path, args: list[str]) -> tuple[list[dict], float, float]:
    """llama-bench's JSON results, the seconds it ran and the CPU seconds other processes used meanwhile."""
    load, before = CpuLoad(), os.times()
    with load.measuring():
        done = subprocess.run([str(llama_bench), *args], capture_output=True, text=True, check=False)
    after = os.times()
    # CpuLoad counts a child's CPU as other processes': take llama-bench's own out again
    own = after.children_user + after.children_system - before.children_user - before.children_system
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: llama-bench exited with code {done.returncode}: {last}")
    return json.loads(done.stdout), load.wall, max(load.others - own, 0.0)


def llama_decode(llama_bench: Path, gguf: Path, threads: int) -> tuple[dict, dict]:
    """llama-bench generating PLAN.new_tokens tokens after PLAN.prompt in its cache, 3 repeats, after waiting
    for a quiet machine: (tokens/s as the median of the repeats, with the CPU others used; the build and
    settings it ran with)."""
    wait_for_quiet(PLAN.quiet_wait)
    (result,), wall, others = _llama_bench(llama_bench, [
        "-m", str(gguf), "-t", str(threads), "-r", "3", "-o", "json", "-p", "0", "-n", str(PLAN.new_tokens),
        "-d", str(PLAN.prompt)])
    other_cores = round(others / max(wall, 1e-9), 3)
    # n_depth positions cached, then the n_gen timed steps see depth + 1 .. depth + n_gen keys
    keys = result["n_depth"] + (result["n_gen"] + 1) / 2
    build = {k: result.get(k) for k in ("build_commit", "model_type", "type_k", "type_v", "flash_attn")}
    return ({"tokens_s": float(np.median(result["samples_ts"])), "values": result["samples_ts"],
             "other_cores": other_cores, "mean_keys": keys}, build)


def ratios(rounds: list[dict], storage: str) -> dict[str, float]:
    """qwen-ref / llama.cpp tokens/s of one storage per work ("decode", "prefill-P"): the median of the rounds'."""
    out = {"decode": float(np.median([x[storage]["qwen-ref"]["tokens_s"] / x[storage]["llama.cpp"]["tokens_s"]
                                      for x in rounds]))}
    for work in (rounds[0][storage].get("prefill", {}).get("qwen-ref") or {}):
        out[work] = float(np.median([x[storage]["prefill"]["qwen-ref"][work] / x[storage]["prefill"]["llama.cpp"][work]
                                     for x in rounds]))
    return out


def _prefill_lines(rounds: list[dict], storages: list[str]) -> list[str]:
    """The prefill table, where the run measured prefill: tokens/s by round of each engine, and their ratio."""
    lines = []
    for storage in storages:
        got = [x[storage].get("prefill") for x in rounds]
        if not all(got):
            continue
        for work in got[0]["qwen-ref"]:
            for engine in ENGINES:
                lines.append(f"| {storage} | {work} | {engine} | " + " / ".join(f"{g[engine][work]:.1f}" for g in got)
                             + f" | {np.median([g[engine][work] for g in got]):.1f} |")
            q = [g["qwen-ref"][work] / g["llama.cpp"][work] for g in got]
            lines.append(f"| {storage} | {work} | qwen-ref / llama.cpp | " + " / ".join(f"{x:.2f}x" for x in q)
                         + f" | {np.median(q):.2f}x |")
    if not lines:
        return []
    return ["Prefill of a 128- and a 512-token prompt into an empty cache (llama-bench `-p`; qwen-ref: tools/bench.py's "
            "prefill workload, logits of the last position), tokens/s, each the median of 3 repeats:", "",
            "| storage | prompt | engine | tokens/s by round | median |", "|---|---|---|---|---|", *lines, ""]


def report(runs: dict, facts: dict, storages: list[str]) -> str:
    """The Markdown table: each engine's tokens/s and fraction of the ceiling by round, and their ratio."""
    rounds = runs["rounds"]
    ceilings = [max(x["read_before"], x["read_after"]) for x in rounds]
    lines = ["| storage | engine | bytes/token | tokens/s by round | of ceiling by round | median of ceiling |",
             "|---|---|---|---|---|---|"]
    summary = []
    for storage in storages:
        medians = {}
        for engine, cache_itemsize in (("llama.cpp", 2), ("qwen-ref", 4)):  # llama.cpp keeps its KV cache in f16
            tok_s = [x[storage][engine]["tokens_s"] for x in rounds]
            per_token = decode_bytes(facts, ITEMSIZE[storage], cache_itemsize, rounds[0][storage][engine]["mean_keys"])
            fractions = [t * per_token["total"] / (c * 1e9) for t, c in zip(tok_s, ceilings)]
            medians[engine] = float(np.median(fractions))
            lines.append(f"| {storage} | {engine} | {per_token['total'] / 1e9:.3f} GB | "
                         + " / ".join(f"{t:.1f}" for t in tok_s) + " | "
                         + " / ".join(f"{f:.0%}" for f in fractions) + f" | {medians[engine]:.0%} |")
        ratios = [x[storage]["qwen-ref"]["tokens_s"] / x[storage]["llama.cpp"]["tokens_s"] for x in rounds]
        lines.append(f"| {storage} | qwen-ref / llama.cpp | | " + " / ".join(f"{q:.2f}x" for q in ratios)
                     + f" | | {np.median(ratios):.2f}x |")
        summary.append(f"{storage}: llama.cpp {medians['llama.cpp']:.0%} of the ceiling, qwen-ref "
                       f"{medians['qwen-ref']:.0%}, qwen-ref {np.median(ratios):.2f}x llama.cpp's tokens/s")
    reads = " / ".join(f"{x['read_before']:.1f}-{x['read_after']:.1f}" for x in rounds)
    builds = "; ".join(f"{s}: {b['model_type']}, build {b['build_commit']}, KV cache {b['type_k']}"
                       for s, b in runs["llama_cpp"].items())
    return "\n".join([
        f"# llama.cpp beside qwen-ref ({runs['finished']}, {runs['threads']} threads)", "",
        f"`{runs['command']}` on {runs['machine']['cpu_model']}. llama.cpp {builds}.", "",
        ("Decode of the random-weight Qwen1.5-0.5B checkpoint (tied embedding), 64 tokens after 128 in the cache; "
         "the ceiling of a round is the higher of the streaming reads before and after it (tools/bench.py's `anon` "
         f"read, GB/s by round: {reads}) over the bytes a step reads. Those reads are a minute from the decodes, "
         "and the host's bandwidth moves by 20% within one: a fraction above 100% is such a move."), "",
        "Medians over the rounds: " + "; ".join(summary) + ".", "", *lines, "", *_prefill_lines(rounds, storages)])


if __name__ == "__main__":
    main()
