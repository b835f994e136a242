"""A checkpoint larger than memory: time, disk reads and anonymous memory of a prompt, layer-major and not.

    python tools/make_checkpoint.py --shape 14b --dtype bfloat16 --out /tmp/qwen1.5-14b-bf16   # ~28 GB
    python tools/bench_bigger_than_ram.py --model /tmp/qwen1.5-14b-bf16

For each mode of `--layer-major` (on: each layer read once per prompt; off: chunk by chunk, every
chunk reading every layer), the checkpoint is evicted from the page cache, then `qwen-ref logits`
runs on a prompt of random token ids while this script samples the process's /proc files: disk
bytes read (`read_bytes` of /proc/PID/io) and resident anonymous memory (RssAnon, the memory the
process owns, as opposed to the checkpoint's file pages, which the kernel can drop at will). Then
`qwen-ref generate` (layer-major) decodes a few tokens. Results go to benchmarks/bigger_than_ram.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import drop_from_page_cache, git_state, machine_info, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def checkpoint_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def watched_run(args: list[str]) -> dict:
    """Run a command; its exit code, wall time, stderr, disk bytes read and peak RssAnon, sampled."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    read_bytes = peak_anon_kb = 0
    while proc.poll() is None:
        try:
            read_bytes = _read_bytes(proc.pid)
            peak_anon_kb = max(peak_anon_kb, _status_kb(proc.pid, "RssAnon"))
        except (OSError, StopIteration):
            pass  # the process ended between poll() and the read
        time.sleep(0.2)
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
            "read_bytes": read_bytes, "peak_rss_anon_bytes": peak_anon_kb * 1024, "stderr": proc.stderr.read()[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (written by make_checkpoint.py)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens `generate` decodes (default: %(default)s)")
    parser.add_argument("--modes", default="on,off", help="--layer-major modes for `logits` (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bigger_than_ram")
    a = parser.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"bench_bigger_than_ram: {a.model} has no config.json")

    config = json.loads((a.model / "config.json").read_text())
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], a.prompt_tokens)
    token_arg = ",".join(map(str, tokens))
    cli = [sys.executable, "-m", "qwen_ref"]
    results = {"model": str(a.model), "checkpoint_bytes": checkpoint_bytes(a.model), "prompt_tokens": a.prompt_tokens,
               "machine": machine_info(), "versions": versions(), "git": git_state(),
               "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "runs": {}}
    out_npz = Path("/tmp/bench_bigger_than_ram_logits.npz")
    for mode in a.modes.split(","):
        drop_from_page_cache(a.model)
        print(f"logits, --layer-major {mode} ...", file=sys.stderr, flush=True)
        results["runs"][f"logits layer-major {mode}"] = watched_run(
            cli + ["logits", "--model", str(a.model), "--tokens", token_arg, "--out", str(out_npz), "--layer-major", mode])
        out_npz.unlink(missing_ok=True)
    drop_from_page_cache(a.model)
    print(f"generate {a.new_tokens} tokens ...", file=sys.stderr, flush=True)
    run = watched_run(cli + ["generate", "--model", str(a.model), "--tokens", token_arg, "--max-new-tokens",
                             str(a.new_tokens), "--temperature", "0", "--layer-major", "on"])
    timing = re.search(r"prompt: (\d+) tokens, ([\d.]+) tok/s \| generated: (\d+) tokens, ([\d.]+) tok/s", run["stderr"])
    if timing:
        run["prefill_tok_s"], run["decode_tok_s"] = float(timing[2]), float(timing[4])
    results["runs"]["generate layer-major on"] = run

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    m = r["machine"]
    size = r["checkpoint_bytes"]
    lines = [
        "# A checkpoint larger than memory",
        "",
        f"`python tools/bench_bigger_than_ram.py --model {r['model']}` at {r['git']['head'][:7]}; "
        f"{m['cpu_model']}, {m['cores_available']} cores, {r['memory_total_bytes'] / 2**30:.1f} GiB of memory; "
        f"checkpoint {size / 1e9:.1f} GB; prompt of {r['prompt_tokens']} random token ids. "
        "The checkpoint is evicted from the page cache before each run. One run each.",
        "",
        f"SIMD flags: {' '.join(m['simd_flags'])}",
        "",
        "| run | exit | seconds | read from disk | of the checkpoint | peak RssAnon | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        lines.append(
            f"| {name} | {run['exit_code']} | {run['seconds']:.0f} | {run['read_bytes'] / 1e9:.1f} GB | "
            f"{run['read_bytes'] / size:.2f}x | {run['peak_rss_anon_bytes'] / 2**30:.2f} GiB | "
            f"{run.get('prefill_tok_s', '')} | {run.get('decode_tok_s', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
