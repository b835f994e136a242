"""tools/bench.py runs end to end (on a tiny model) and writes results of the documented structure.

No timing is asserted: CI machines are too noisy for that. The full benchmark is run by hand.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MEASUREMENT_KINDS = {"bandwidth", "gemm", "qwen_decode", "qwen_prefill", "profile", "hf_decode", "hf_prefill", "ttft"}


def test_bench_smoke_writes_results_and_markdown_with_positive_numbers(tmp_path, torch_reference):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--smoke", "--threads", "1",
         "--out", str(out), "--checkpoints", str(tmp_path / "checkpoints")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    # one folder per host kind, and the index of every host beside it
    (host,) = (out / "hosts").iterdir()
    results = json.loads((host / "results.json").read_text())
    for key in ("command", "machine", "versions", "plan", "models", "measurements", "targets"):
        assert key in results
    assert results["machine"]["cpu_flags"] and results["machine"]["cores_available"] >= 1
    assert results["machine"]["slug"] == host.name and host.name.endswith(results["machine"]["flag_class"])
    assert {"python", "numpy", "numba", "torch", "transformers"} <= set(results["versions"])

    measurements = results["measurements"]
    assert {m["kind"] for m in measurements.values()} == MEASUREMENT_KINDS  # every workload kind ran
    for name, m in measurements.items():
        assert "error" not in m, name
        assert m["repeats"] == len(m["values"]) >= 1, name
        assert 0 < m["min"] <= m["median"] <= m["max"], name
        assert m["peak_rss_bytes"] > 0, name

    model = "qwen-ref/numba/tiny-bf16"
    decode, prefill = measurements[f"{model}/decode/1t"], measurements[f"{model}/prefill-16/1t"]
    # derived figures exist wherever the run measured what they need
    for m in (decode, prefill, measurements[f"{model}/decode-ctx-32/1t"]):
        assert m["ceiling"] > 0 and m["fraction_of_ceiling"] > 0
        assert m["vs_transformers_float32"] > 0
    assert decode["bytes_per_token"]["weights"] > 0 and decode["rss_budget_bytes"] > 0
    assert measurements["qwen-ref/numpy/tiny-bf16/decode/1t"]["median"] > 0
    assert "attention" in measurements["profile/numba/tiny-bf16/decode-ctx-32/1t"]["ops"]
    # every qwen-ref numba workload says which prefill GEMM ran and how warm its checkpoint was at load
    for name, m in measurements.items():
        if m["kind"] in ("qwen_decode", "qwen_prefill") and m["spec"]["backend"] == "numba":
            assert m["prefill_gemm"] in ("numba-gemm", "blas-gemm") and 0 <= m["page_cache_at_load"] <= 1, name
    # time to first token in fresh processes: the checkpoint evicted (cold), then cached (warm)
    cold, warm = (measurements[f"{model}/ttft-16-{state}/1t"] for state in ("cold", "warm"))
    # (a tmpfs cannot evict: there the cold run is as warm as the other, and this says nothing of them)
    tmpfs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip() == "tmpfs"
    assert warm["page_cache_before"] == [1.0] and (tmpfs or cold["page_cache_before"] == [0.0])
    assert all(m["cli_first_token_seconds"][0] > m["cli_load_seconds"][0] > 0 for m in (cold, warm))
    assert len(results["targets"]) == 8

    # the paired round: each target workload against the ceiling measured on either side of it, with the
    # bytes or FLOPs per token of the same workload in the main list
    def ceiling(label: str) -> float:
        return measurements[f"paired/1/ceiling/{label}/1t"]["median"]

    bandwidth = max(ceiling("bandwidth/anon"), ceiling("bandwidth-after/anon"))
    gemm = max(ceiling("gemm/tiny/T16"), ceiling("gemm-after/tiny/T16"))
    fractions = results["paired_fractions"]
    assert set(fractions) == {"decode", "decode-ctx-32", "prefill-16"}
    (only,) = fractions["prefill-16"]["rounds"]
    assert only["ceiling_rate"] == gemm and only["ceiling"] == gemm * 1e9 / prefill["flops_per_token"]
    assert only["fraction"] == only["qwen_ref"] / only["ceiling"] and not only["beside"]
    assert only["qwen_ref"] == measurements[f"paired/1/{model}/prefill-16/1t"]["median"]
    assert "bf16_bound" not in only and "apart_rate" not in only
    # the decodes read the ceiling in their own process around each repeat: each repeat is judged against
    # the higher reading beside it, the round by the medians (the same arithmetic on the same numbers: exact)
    for work in ("decode", "decode-ctx-32"):
        ours = measurements[f"paired/1/{model}/{work}/1t"]
        (only,) = fractions[work]["rounds"]
        assert only["beside"] and len(ours["beside"]) == len(ours["values"]) == ours["repeats"], work
        rates = [max(x["before"]["anon"], x["after"]["anon"]) for x in ours["beside"]]
        bf16 = [max(x["before"]["anon-bf16"], x["after"]["anon-bf16"]) for x in ours["beside"]]
        read = ours["bytes_per_token"]
        ceilings = [rate * 1e9 / read["total"] for rate in rates]
        assert only["qwen_ref"] == ours["median"] and only["ceiling_rate"] == np.median(rates), work
        assert only["fraction"] == np.median([v / c for v, c in zip(ours["values"], ceilings)]), work
        assert only["apart_rate"] == bandwidth, work  # the round's separate reads, kept for comparison
        assert only["apart_fraction"] == ours["median"] / (bandwidth * 1e9 / read["total"]), work
        # the bfloat16 bound: weights at the bf16 read's speed (never above the stream's), KV cache at the stream's
        bounds = [1e9 / (read["weights"] / min(f, rate) + read["kv_cache"] / rate) for f, rate in zip(bf16, rates)]
        assert only["bf16_rate"] == np.median(bf16) and only["bf16_bound"] == np.median(bounds), work
        assert only["fraction_of_bound"] == np.median([v / b for v, b in zip(ours["values"], bounds)]), work
        assert fractions[work]["median_fraction_of_bound"] == only["fraction_of_bound"], work
        assert fractions[work]["median_bound_of_ceiling"] == only["bound_of_ceiling"] <= 1, work
    judged = [tg for tg in results["targets"] if "llama.cpp" not in tg["target"] and "RSS" not in tg["target"]]
    assert len(judged) == 5
    for target in judged:  # the bf16 bound is read in the paired rounds only: no main-list figure
        assert "median of 1 paired round)" in target["target"] and target["value"] > 0, target
        assert target["measured"] in {m["measured_at"][:10] for m in measurements.values()}, target
    assert [tg["met"] for tg in results["targets"] if "llama.cpp" in tg["target"]] == [None, None]

    # the KV cache dtypes at the longest context, alternating in one process: one measurement per dtype, with
    # each round's ratio to the float32 cache's round; a 16-bit cache reads half the cache's bytes
    kv = {d: measurements[f"{model}/decode-ctx-32-kv-{d}/1t"] for d in ("float32", "bfloat16", "float16")}
    for d, m in kv.items():
        assert m["kv_dtype"] == d and len(m["values"]) == len(kv["float32"]["values"]) == results["plan"]["repeats"]
        rounds = [v / f for v, f in zip(m["values"], kv["float32"]["values"])]
        assert m["vs_float32_rounds"] == rounds and m["vs_float32"] == np.median(rounds), d
        halved = 1 if d == "float32" else 2
        assert m["bytes_per_token"]["kv_cache"] * halved == kv["float32"]["bytes_per_token"]["kv_cache"], d
    assert results["machine"]["lscpu"] is None or results["machine"]["lscpu"]["Flags"]

    markdown = (host / "BENCHMARKS.md").read_text()
    assert "| anon-bf16 |" in markdown and "| of bf16 bound |" in markdown and "| of that ceiling |" in markdown
    for heading in ("## Targets", "## Ceilings", "## Decode", "## Prefill", "## Decode against context length",
                    "## KV cache dtype at context 32", "## Time to first token", "## Paired rounds"):
        assert heading in markdown
    index = (out / "BENCHMARKS.md").read_text()
    assert f"| [{host.name}](hosts/{host.name}/BENCHMARKS.md) |" in index and "## Targets, host by host" in index


def test_bench_llamacpp_refuses_bad_arguments_in_one_line(tmp_path):
    # llama.cpp is not installed here: the comparison script must say what is wrong, not trace back
    gguf = tmp_path / "q05-bf16.gguf"
    gguf.write_bytes(b"GGUF")
    cases = [(["--llama-bench", str(tmp_path / "llama-bench"), "--gguf", f"bf16={gguf}"], "error: --llama-bench "),
             (["--llama-bench", str(gguf), "--gguf", str(gguf)], "error: --gguf "),  # no STORAGE=
             (["--llama-bench", str(gguf), "--gguf", f"q4={gguf}"], "error: --gguf q4="),
             (["--llama-bench", str(gguf), "--gguf", f"bf16={gguf}", "--rounds", "0"], "error: --rounds")]
    for args, message in cases:
        run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_llamacpp.py"), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stderr.startswith(message) and run.stderr.count("\n") == 1, (args, run.stderr)


def test_bench_bf16_read_checks_its_gemvs_and_writes_every_kernel_of_every_round(tmp_path):
    # 128 MB instead of 1 GiB, no waiting for a quiet machine (the suite runs two test files at once): the
    # numbers mean nothing here, the agreement check and the files do
    out = tmp_path / "bf16_read.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_bf16_read.py"), "--gib", "0.125",
                          "--rounds", "2", "--pause", "0", "--quiet-wait", "0", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    kernels = {"stream", "bf16 read", "qwen-ref GEMV", "C GEMV", "C GEMV, prefetch", "qwen-ref GEMV in calls",
               "C GEMV, prefetch, in calls"}
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert set(r["GB/s"]) == set(r["other_and_steal_cores"]) == kernels
    assert set(results["agreement"]) == kernels - {"stream", "bf16 read"}
    assert "| C GEMV, prefetch, in calls |" in out.with_suffix(".md").read_text()


def test_bench_bf16_read_agreement_check_fails_a_gemv_that_skips_rows():
    sys.path.insert(0, str(REPO / "tools"))
    from bench_bf16_read import GEMVS, check_agreement

    rng = np.random.default_rng(0)
    words = rng.integers(0x3C00, 0x4000, size=(64, 64), dtype=np.uint16)  # [rows, n_in], |w| in [2^-7, 2)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = (words.astype(np.uint32) << 16).view(np.float32)  # [rows, n_in] float32, exact
    runs = {}
    for name in GEMVS:
        y = np.empty(64, dtype=np.float32)
        runs[name] = (functools.partial(np.matmul, w, x[0], out=y), y, w.nbytes)  # a float32 GEMV
    assert all(ratio <= 1 for ratio in check_agreement(runs, words.view(np.uint32), x).values())

    y = np.empty(64, dtype=np.float32)
    runs["C GEMV, prefetch"] = (functools.partial(np.matmul, w[:32], x[0], out=y[:32]), y, w.nbytes)  # half the rows
    with pytest.raises(SystemExit, match="C GEMV, prefetch is off the exact product by nan"):
        check_agreement(runs, words.view(np.uint32), x)


def test_bench_bf16_read_refuses_bad_arguments_in_one_line(tmp_path):
    cases = [(["--rounds", "0"], "error: --rounds"), (["--n-in", "100"], "error: --n-in"),
             (["--gib", "0"], "error: --gib"), (["--gib", "inf"], "error: --gib"), (["--gib", "1e6"], "error: --gib"),
             (["--pause", "nan"], "error: --pause"), (["--quiet-wait", "-1"], "error: --quiet-wait"), (["--call-mb", "1e9"], "error: --call-mb"),
             (["--out", str(tmp_path / "no" / "x.json")], "error: --out"),
             (["--gib", "0.01", "--threads", "0"], "error: --threads"),
             (["--gib", "0.01", "--cc", str(tmp_path / "no-cc")], "error: cannot run the C compiler"),
             (["--gib", "0.01", "--cc", "true"], "error: true did not make a library")]
    for args, message in cases:
        run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_bf16_read.py"), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stderr.startswith(message) and run.stderr.count("\n") == 1, (args, run.stderr)
