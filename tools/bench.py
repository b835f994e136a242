"""Benchmark qwen-ref against the machine's ceilings and against transformers, in one run.

    python tools/bench.py                                        # the full run: about 45 min
    python tools/bench.py --only 'qwen-ref/numba/0.5b-bf16/*'    # rerun a subset, merged into this host's results
    python tools/bench.py --report                               # remake every host's page and the index
    python tools/bench.py --smoke --out /tmp/bench               # a tiny model in about a minute: CI runs the script

Each host kind (CPU model name and SIMD class, bench_hosts.py) has its folder under --out:
hosts/<host>/results.json (every measurement with its median, min, max, repeats and peak resident
memory; the host's CPU, flags, cores and memory) and hosts/<host>/BENCHMARKS.md (tables, fractions
of the ceilings, ratios to transformers, time to first token cold and warm, the targets). A run
writes its own host's folder only, then the index --out/BENCHMARKS.md, every host side by side. The
headline table also goes to stdout, progress to stderr. Random-weight checkpoints of the exact
Qwen1.5-0.5B and -1.8B shapes are written once by tools/make_checkpoint.py under --checkpoints and reused.

Every workload runs in a fresh subprocess (this script with --worker): its peak resident memory is
then its own (os.wait4), and no JIT, BLAS or torch thread-pool state leaks from one to the next.
The machine is shared: each measurement records the CPU that other processes used while it ran.
Needs the `reference` extra (torch, transformers).

The code: bench_plan.py (what one run measures: sizes and workloads), bench_workers.py (inside a
worker subprocess), bench_figures.py (bytes, FLOPs, ceilings, targets), bench_report.py (a host's
BENCHMARKS.md), bench_hosts.py (host kinds, the index); this file: the command line, the checkpoints
and the worker subprocesses.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_figures import derive, model_facts, paired_fractions, paired_ratios, targets
from bench_plan import DTYPES, SMOKE, Plan, Workload, build_workloads, checkpoint_name
from bench_report import _gb, _range, markdown
from bench_hosts import host_facts, index_markdown
from bench_workers import drop_file_from_page_cache, drop_from_page_cache, worker_main  # noqa: F401 (bench_llamacpp)

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()


# =================================================================================================
# The parent: checkpoints, subprocesses, peak memory


def ensure_checkpoint(root: Path, shape: str, dtype: str) -> Path:
    """The checkpoint folder, written by tools/make_checkpoint.py unless a complete one is there."""
    out = root / checkpoint_name(shape, dtype)
    config = out / "config.json"
    if config.is_file() and any(out.glob("*.safetensors")):
        if json.loads(config.read_text()).get("torch_dtype") == DTYPES[dtype]:
            drop_from_page_cache(out)
            return out
        shutil.rmtree(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"making checkpoint {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "make_checkpoint.py"), "--shape", shape,
                    "--dtype", DTYPES[dtype], "--out", str(partial)], check=True, stdout=subprocess.DEVNULL)
    partial.rename(out)  # only a finished checkpoint gets the real name
    drop_from_page_cache(out)
    return out


def kernels_digest() -> str:
    """Which jitkernels/ source a workload ran (another engineer may be changing it during the run)."""
    h = hashlib.sha256()
    for path in sorted((REPO / "jitkernels").glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def run_workload(w: Workload) -> list[dict]:
    """Run one workload in a fresh subprocess; its measurements, each with the subprocess's peak RSS."""
    # PYTHONPATH: measure the qwen_ref and kernels of this tree, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    digest, started = kernels_digest(), time.time()
    proc = subprocess.Popen([sys.executable, str(THIS), "--worker", json.dumps(w.spec)], stdout=subprocess.PIPE,
                            cwd=REPO, env=env)
    output = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not a running max over children
    proc.returncode = os.waitstatus_to_exitcode(status)
    common = {"workload": w.name, "kind": w.spec["kind"], "threads": w.spec["threads"], **w.params,
              "spec": w.spec, "peak_rss_bytes": usage.ru_maxrss * 1024, "kernels_sha": digest,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "workload_seconds": round(time.time() - started, 1)}
    if proc.returncode != 0:
        return [{"name": w.name, **common, "error": f"worker exited with code {proc.returncode}"}]
    result = json.loads(output)
    return [{"name": m.pop("name", w.name), **common, "vm_hwm_bytes": result["vm_hwm_bytes"], **m}
            for m in result["measurements"]]


# =================================================================================================
# Command line


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()

    def field_of(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(key)), "?")

    flags = field_of("flags").split()
    simd = [f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "f16c", "amx")) or f in ("bmi2",)]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    described = lscpu()
    return {"cpu_model": field_of("model name"), **host_facts(field_of("model name"), flags, described),
            "cpu_flags": flags, "simd_flags": simd,
            "cores_available": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "kernel": platform.release(), "thp": thp.read_text().strip() if thp.is_file() else "?",
            "lscpu": described}


def lscpu() -> dict | None:
    """Every field lscpu prints (model name, flags, cache sizes, hypervisor ...), or None without lscpu."""
    try:
        out = subprocess.run(["lscpu", "-J"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    fields = {}

    def walk(entries: list[dict]) -> None:  # newer versions nest some fields under "children"
        for e in entries:
            fields[e["field"].rstrip(":")] = e.get("data")
            walk(e.get("children", []))

    walk(json.loads(out)["lscpu"])
    return fields


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "numba", "llvmlite", "torch", "transformers", "qwen-ref"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain").splitlines()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks",
                        help="where hosts/<this host>/results.json and BENCHMARKS.md go, and the index "
                             "BENCHMARKS.md of every host (default: benchmarks/)")
    parser.add_argument("--checkpoints", type=Path, default=REPO / "benchmarks" / "checkpoints",
                        help="cache folder of the random-weight checkpoints, made when missing "
                             "(default: benchmarks/checkpoints/)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only the workloads whose name matches one of these glob patterns (see --list); "
                             "their results replace the same names in this host's results.json (default: all)")
    parser.add_argument("--list", action="store_true", help="print the workload names and exit")
    parser.add_argument("--repeats", type=int,
                        help=f"timed repeats of each model workload (default: {Plan.repeats}, {SMOKE.repeats} with --smoke)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of every workload; 1-thread scaling runs are added when > 1 "
                             "(default: every available core, here %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and tiny sizes: checks the script, measures nothing")
    parser.add_argument("--report", action="store_true",
                        help="only remake every host's BENCHMARKS.md from its results.json, and the index")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.report:
        return report_only(args.out)

    plan = SMOKE if args.smoke else Plan()
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    workloads = build_workloads(plan, args.threads, args.checkpoints)
    if args.list:
        print("\n".join(w.name for w in workloads))
        return 0
    if args.only:
        workloads = [w for w in workloads if any(fnmatch.fnmatchcase(w.name, p) for p in args.only)]
        if not workloads:
            parser.error("--only matches no workload (see --list)")

    started = time.time()
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    needed = {Path(w.spec.get("model_dir", "")).name for w in workloads} | {checkpoint_name(s, "bf16") for s in plan.shapes}
    for shape in plan.shapes:
        for dtype in plan.dtypes:
            if checkpoint_name(shape, dtype) in needed:
                ensure_checkpoint(args.checkpoints, shape, dtype)

    machine = machine_info()
    host_dir = args.out / "hosts" / machine["slug"]
    results_path = host_dir / "results.json"
    previous = json.loads(results_path.read_text()) if args.only and results_path.is_file() else {}
    results = {
        "schema": 1,
        "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "threads": args.threads, "smoke": args.smoke, "plan": dataclasses.asdict(plan),
        "machine": machine, "versions": versions(), "git": git_state(),
        "models": {f"{s}-{d}": model_facts(args.checkpoints / checkpoint_name(s, d)) for s in plan.shapes
                   for d in plan.dtypes if (args.checkpoints / checkpoint_name(s, d)).is_dir()},
        "measurements": dict(previous.get("measurements", {})),
    }
    if previous:
        results["earlier_runs"] = previous.get("earlier_runs", []) + [
            {k: previous.get(k) for k in ("command", "started", "finished")}]
        results.update({k: previous[k] for k in ("notes", "llamacpp") if k in previous})  # the host's, not the run's
    host_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, w in enumerate(workloads, 1):
        print(f"[{i}/{len(workloads)}] {w.name}", file=sys.stderr, flush=True)
        for m in run_workload(w):
            results["measurements"][m["name"]] = m
            if "error" in m:
                failed.append(m["name"])
                print(f"  FAILED: {m['error']}", file=sys.stderr, flush=True)
            else:
                print(f"  {m['name']}: {_range(m)} {m['unit']}, peak RSS {_gb(m['peak_rss_bytes'])}, other processes "
                      f"{m.get('other_cores', 0):.2f} cores, {m['workload_seconds']:.0f} s", file=sys.stderr, flush=True)
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        results["runtime_minutes"] = (time.time() - started) / 60
        results["complete"] = i == len(workloads)
        write_results(results, host_dir, plan)  # after every workload: an interrupted run keeps what it measured
    print(write_results(results, host_dir, plan))
    write_index(args.out)
    print(f"wrote {results_path}, {host_dir / 'BENCHMARKS.md'} and {args.out / 'BENCHMARKS.md'} in "
          f"{results['runtime_minutes']:.1f} min"
          + (f"; {len(failed)} workloads failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def write_results(results: dict, host_dir: Path, plan: Plan) -> str:
    """Derive ceilings, fractions, ratios and targets; write the host's results.json and BENCHMARKS.md; return
    the latter."""
    derive(results["measurements"], results["models"])
    results["paired"] = paired_ratios(results["measurements"], plan, results["threads"])
    results["paired_fractions"] = paired_fractions(results["measurements"], plan, results["threads"])
    results["targets"] = targets(results["measurements"], plan, results["threads"], results["paired"],
                                 results["paired_fractions"], results.get("llamacpp"))
    (host_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results, plan)
    (host_dir / "BENCHMARKS.md").write_text(md + "\n")
    return md


def host_results(out: Path) -> dict[str, dict]:
    """Every host's results.json under out/hosts/, by host."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "hosts").glob("*/results.json"))}


def write_index(out: Path) -> None:
    """out/BENCHMARKS.md: every host's results side by side."""
    hosts = host_results(out)
    for slug, results in hosts.items():
        results["_files"] = [p.name for p in (out / "hosts" / slug).iterdir() if p.is_file()]
    (out / "BENCHMARKS.md").write_text(index_markdown(hosts) + "\n")


def report_only(out: Path) -> int:
    """Remake every host's BENCHMARKS.md (and the derived figures) from its results.json, then the index."""
    for slug, results in host_results(out).items():
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["plan"].items()})
        write_results(results, out / "hosts" / slug, plan)
    write_index(out)
    print(f"wrote {out / 'BENCHMARKS.md'} and the pages of {len(host_results(out))} hosts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
