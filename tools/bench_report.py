"""BENCHMARKS.md from the results of tools/bench.py (results.json with its derived figures): the
machine, the targets, the ceilings, tables of decode, prefill, context length, backends and threads,
the op-by-op profile and the method; and the number formats the progress lines use too.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from bench_plan import NOISY_CORES, Plan


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{max(0, digits - 1 - int(np.floor(np.log10(abs(x)))))}f}" if x else "0"


def _range(m: dict | None) -> str:
    if not m:
        return "—"
    if "error" in m:
        return "failed"
    return f"{_f(m['median'])} ({_f(m['min'])}–{_f(m['max'])})"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _gb(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB"


def _busy(m: dict | None) -> str:
    """⚠ and the cores other processes (or the hypervisor) took during a measurement, when that was >= 0.2."""
    if not m:
        return ""
    taken = m.get("other_cores", 0) + m.get("steal_cores", 0)
    return f" ⚠{taken:.1f}" if taken >= 0.2 else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _kv_dtypes_section(M: dict, plan: Plan, t: str) -> list[str]:
    """The headline's decode at the longest context with each --kv-dtype, alternating in one process."""
    ctx, first = plan.contexts[-1], plan.kv_dtypes[0]
    found = [(d, M.get(f"qwen-ref/numba/{plan.headline}/decode-ctx-{ctx}-kv-{d}/{t}")) for d in plan.kv_dtypes]
    found = [(d, m) for d, m in found if m]
    if not found:
        return []
    lines = [f"## KV cache dtype at context {ctx} ({plan.headline})", "",
             f"`--kv-dtype`: one process decodes with a cache of each dtype ({', '.join(plan.kv_dtypes)}), filled "
             f"with the same random values, one repeat of each per round, the order rotating from round to round; "
             f"{plan.context_new_tokens} new tokens per repeat. vs {first}: the median over the rounds of each round's "
             f"ratio to the {first} cache's tokens/s (min–max over the rounds). The ceiling is the run's streaming "
             "read over the bytes a step reads, that cache's included. The machine is described at the top "
             "(results.json: `machine.lscpu`).", ""]
    rows = []
    for d, m in found:
        b, ratios = m.get("bytes_per_token", {}), m.get(f"vs_{first}_rounds", [])
        vs = f"{_x(m.get(f'vs_{first}'))} ({_x(min(ratios))}–{_x(max(ratios))})" if ratios and d != first else "—"
        rows.append([d, _range(m) + _busy(m), _gb(b.get("kv_cache")), _gb(b.get("total")), _f(m.get("ceiling")),
                     _pct(m.get("fraction_of_ceiling")), vs, str(m.get("repeats", "—"))])
    peak = found[0][1].get("peak_rss_bytes")
    return lines + _table(["kv dtype", "tokens/s", "KV cache/token", "bytes/token", "ceiling tok/s", "of ceiling",
                           f"vs {first}", "rounds"], rows) + ["", f"Peak RSS of the process (all caches): {_gb(peak)}.",
                                                              ""]


def markdown(results: dict, plan: Plan) -> str:
    M, threads = results["measurements"], results["threads"]
    t = f"{threads}t"
    runs = [*results.get("earlier_runs", []), results]  # --only reruns merge into an earlier run's results
    mach, ver = results["machine"], results["versions"]
    lines = [f"# qwen-ref benchmarks on {mach.get('slug', mach['cpu_model'])}", "",
             "Measured by " + ", then ".join(f"`{r['command']}` ({r['started']} to {r['finished']})" for r in runs)
             + ". Regenerate with `python tools/bench.py` on a host of this kind (all options: `--help`); a rerun "
             "of some workloads (`--only`) replaces just their measurements. Every host side by side: "
             "[../../BENCHMARKS.md](../../BENCHMARKS.md).", ""]
    lines += [f"> {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    family = "/".join(str(x) for x in (mach.get("cpu_family"), mach.get("cpu_model_number")) if x)
    lines += [f"**Machine**: {mach['cpu_model']}" + (f" (family/model {family})" if family else "")
              + f", {mach['cores_available']} cores available, "
              f"{mach['memory_gb']:.0f} GB, Linux {mach['kernel']}; transparent huge pages `{mach['thp']}`. "
              f"SIMD flags: {', '.join(mach['simd_flags'])}.", "",
              *_loaded_lines(M),
              "**Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".", "",
              f"**Threads**: {threads} unless a name ends in `1t` (qwen-ref: `qwen_ref.threads.set_threads`; "
              "transformers: `torch.set_num_threads`).", ""]
    uses_kernels = {n: m.get("kernels_sha") for n, m in M.items() if m["kind"] == "profile"
                    or (m["kind"].startswith("qwen_") and m["spec"].get("backend") == "numba")}
    versions_seen = defaultdict(list)
    for n, digest in uses_kernels.items():
        versions_seen[digest].append(n)
    if len(versions_seen) > 1:
        lines += ["**Note**: `jitkernels/` changed while this was measured: " + "; ".join(
            f"version {d} ran {len(ns)} of the numba measurements" for d, ns in versions_seen.items())
            + " (each measurement in results.json records its `kernels_sha`).", ""]
    busy = [n for n, m in M.items() if _busy(m)]
    redone = sum(len(m.get("discarded", [])) for m in M.values())
    lines += [f"**Noise**: each timed repeat records the CPU other processes used meanwhile (/proc/stat); "
              f"{redone} repeats were discarded and measured again after the machine went quiet because others "
              f"used > {NOISY_CORES} cores. " + (f"{len(busy)} measurements still averaged >= 0.2 busy cores: marked "
              "⚠ with that load; treat them as lower bounds." if busy else "No kept measurement averaged >= 0.2 busy cores."), ""]

    lines += ["## Targets", ""]
    rows = []
    for tg in results["targets"]:
        fmt = _x if tg.get("unit") == "ratio" else _pct
        value = tg["value"] if isinstance(tg["value"], str) else fmt(tg["value"])
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[tg["met"]]
        main = "" if tg.get("main_list") is None or tg["main_list"] == tg["value"] else fmt(tg["main_list"])
        rows.append([tg["target"], value, main, "" if tg["threshold"] is None else f"{tg['op']} {fmt(tg['threshold'])}",
                     verdict])
    lines += _table(["target", "measured", "main list", "threshold", ""], rows) + [""]
    if any(tg.get("main_list") is not None and tg["main_list"] != tg["value"] for tg in results["targets"]):
        lines += ["A target marked \"median of N paired rounds\" takes each figure beside its ceiling or its "
                  "transformers baseline (see Paired rounds below); the main list column is the same figure from "
                  "the tables below, whose ceilings are the higher of the measurements at the start and the end "
                  "of the run.", ""]
    bounds = {w: p for w, p in results.get("paired_fractions", {}).items() if "median_bound_of_ceiling" in p}
    if bounds:
        lines += ["The decode ceilings are float32 streaming reads. The same array read as bfloat16 and widened as "
                  "qwen-ref's GEMV widens it (`anon-bf16` below) is a measured bound for a decode whose kernels widen that way; in the "
                  "paired rounds that bound was, as a median, " + "; ".join(
                      f"{work} {_pct(p['median_bound_of_ceiling'])} of the ceiling, and qwen-ref reached "
                      f"{_pct(p['median_fraction_of_bound'])} of the bound (median of {p['bound_rounds']})"
                      for work, p in bounds.items()) + ".", ""]

    reads = ("Streaming read: a Numba `prange` over the rows of a float32 array, summing each row once (the "
             "access pattern of a GEMV), median of repeats. `anon`: a 1 GiB NumPy array (NumPy asks for huge "
             "pages); `mmap-file`: the 0.5B bf16 checkpoint file mapped as qwen-ref maps its weights "
             "(`qwen_ref.weights.map_file`).")
    if any(M.get(f"ceiling/{label}/anon-bf16/{n}t") for label in ("bandwidth", "bandwidth-end") for n in (1, threads)):
        reads += (" `anon-bf16`: the same anonymous array read as bfloat16 words, each widened to float32 as "
                  "qwen-ref's GEMV widens them (a shift or a mask per 8 words) and added: no more work per byte than "
                  "that GEMV, whose fused multiply-adds cost what these adds cost and which also loads x. Where it "
                  "reads slower than `anon` (the same bytes in the same order), the difference is the widening work "
                  "the cores do. It is a measured rate, not a proven limit of the CPU.")
    lines += ["## Ceilings of this machine (measured in this run)", "", reads, ""]
    rows = [[f"{kind}{when}", *[_range(M.get(f"ceiling/{label}/{kind}/{n}t")) + _busy(M.get(f"ceiling/{label}/{kind}/{n}t"))
                                for n in sorted({1, threads})]]
            for label, when in (("bandwidth", ""), ("bandwidth-end", ", again at the end"))
            for kind in ("anon", "anon-bf16", "mmap-file") if any(M.get(f"ceiling/{label}/{kind}/{n}t") for n in (1, threads))]
    lines += _table(["read bandwidth, GB/s", *[f"{n} thread(s)" for n in sorted({1, threads})]], rows) + [""]
    rows = []
    for label, when in (("gemm", ""), ("gemm-end", ", again at the end")):
        for shape in plan.shapes:
            for P in plan.prefill_prompts:
                found = [M.get(f"ceiling/{label}/{shape}/T{P}/{n}t") for n in sorted({1, threads})]
                if any(found):
                    rows.append([f"{shape} layer, T={P}{when}", *[_range(m) + _busy(m) for m in found]])
    blas = next((m.get("blas") for m in M.values() if m.get("blas")), None)
    lines += ["Float32 GEMM: NumPy's BLAS (" + (", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}"
              for b in blas) if blas else "?") + ") on the seven products of one decoder layer, `x[T, n_in] @ W.T`.", ""]
    lines += _table(["GEMM GFLOP/s", *[f"{n} thread(s)" for n in sorted({1, threads})]], rows) + [""]
    lines += ["Decode ceiling (tokens/s) = `anon` bandwidth / bytes a step reads (with the run's threads, the higher median of "
              "the start and the end of the run; 1 thread: the start): every layer matrix, bias and norm, the final "
              "norm, the LM head (for a tied model the embedding matrix, read as the head), one embedding row, and "
              "the KV cache at the step's context (keys and values, float32 in qwen-ref: 2 x L x Hkv x hd x 4 bytes "
              "per position, 2 bytes with a 16-bit `--kv-dtype`; transformers keeps its cache in the model dtype). "
              "Prefill ceiling = GEMM GFLOP/s at the "
              "prompt's T (as for bandwidth, the higher median of start and end with the run's threads) / FLOPs per token: 2 x layer-matrix params + 2 x V x D / T (the LM head, last position "
              "only) + 4 x L x H x hd x (T + 1) / 2 (causal attention). The fraction-of-ceiling targets use the same "
              "arithmetic with the ceilings measured beside each workload in the paired rounds (see there).", ""]

    lines += ["## Decode", "", f"Greedy, {plan.prompt}-token prompt, {plan.new_tokens} new tokens per repeat "
              f"({plan.slow_new_tokens} for 1.8B in float32, qwen-ref and transformers); tokens/s of the steps after "
              "the first token, prefill excluded; median (min–max) of the repeats. transformers loads the bf16 "
              "checkpoint and converts it to the dtype named. vs HF: qwen-ref tokens/s / transformers tokens/s.", ""]
    rows = []
    for shape in plan.shapes:
        for dtype in plan.dtypes:
            m = M.get(f"qwen-ref/numba/{shape}-{dtype}/decode/{t}")
            if not m:
                continue
            rows.append([f"{shape} {dtype}", _range(m) + _busy(m), _gb(m.get("bytes_per_token", {}).get("total")),
                         _f(m.get("ceiling")), _pct(m.get("fraction_of_ceiling")), _x(m.get("vs_transformers_float32")),
                         _x(m.get("vs_transformers_bfloat16")), _gb(m.get("peak_rss_bytes")), _gb(m.get("rss_budget_bytes"))])
        for torch_dtype in ("float32", "bfloat16"):
            m = M.get(f"transformers/{torch_dtype}/{shape}/decode/{t}")
            if m:
                rows.append([f"{shape} transformers {torch_dtype}", _range(m) + _busy(m),
                             _gb(m.get("bytes_per_token", {}).get("total")), _f(m.get("ceiling")),
                             _pct(m.get("fraction_of_ceiling")), "", "", _gb(m.get("peak_rss_bytes")), ""])
    lines += _table(["model, storage", "tokens/s", "bytes/token", "ceiling tok/s", "of ceiling", "vs HF f32",
                     "vs HF bf16", "peak RSS", "RSS budget"], rows) + [""]

    for P in plan.prefill_prompts:
        lines += [f"## Prefill, {P}-token prompt", "", "One prompt into an empty cache, logits of the last position "
                  "only (as generation needs them); tokens/s, median (min–max).", ""]
        rows = []
        for shape in plan.shapes:
            for dtype in plan.dtypes:
                m = M.get(f"qwen-ref/numba/{shape}-{dtype}/prefill-{P}/{t}")
                if m:
                    rows.append([f"{shape} {dtype}", _range(m) + _busy(m), _f(m.get("flops_per_token", 0) / 1e9),
                                 _f(m.get("ceiling")), _pct(m.get("fraction_of_ceiling")),
                                 _x(m.get("vs_transformers_float32")), _x(m.get("vs_transformers_bfloat16")),
                                 _gb(m.get("peak_rss_bytes"))])
            for torch_dtype in ("float32", "bfloat16"):
                m = M.get(f"transformers/{torch_dtype}/{shape}/prefill-{P}/{t}")
                if m:
                    rows.append([f"{shape} transformers {torch_dtype}", _range(m) + _busy(m), "", _f(m.get("ceiling")),
                                 _pct(m.get("fraction_of_ceiling")), "", "", _gb(m.get("peak_rss_bytes"))])
        lines += _table(["model, storage", "tokens/s", "GFLOP/token", "ceiling tok/s", "of ceiling", "vs HF f32",
                         "vs HF bf16", "peak RSS"], rows) + [""]

    lines += [f"## Decode against context length ({plan.headline})", "",
              f"The KV cache is filled with {plan.contexts} positions of random keys and values "
              "(`cache.keys[:, :, :ctx] = ...; cache.length = ctx`) instead of prefilling that many real tokens: "
              "a decode step's cost does not depend on the values. transformers gets a DynamicCache filled the same "
              f"way. {plan.context_new_tokens} new tokens per repeat ({plan.hf_context_new_tokens} for transformers, which "
              "copies its whole cache at every step). The attention share comes from the op profile below.", ""]
    rows = []
    for ctx in plan.contexts:
        m = M.get(f"qwen-ref/numba/{plan.headline}/decode-ctx-{ctx}/{t}")
        if not m:
            continue
        b = m.get("bytes_per_token", {})
        prof = M.get(f"profile/numba/{plan.headline}/decode-ctx-{ctx}/{t}", {}).get("ops", {})
        hf = M.get(f"transformers/float32/{plan.headline.split('-')[0]}/decode-ctx-{ctx}/{t}")
        rows.append([str(ctx), _range(m) + _busy(m), _gb(b.get("weights")), _gb(b.get("kv_cache")),
                     _pct(b["kv_cache"] / b["total"]) if b else "—", _f(m.get("ceiling")), _pct(m.get("fraction_of_ceiling")),
                     _pct(prof.get("attention", {}).get("share")), _range(hf), _x(m.get("vs_transformers_float32")),
                     _gb(m.get("peak_rss_bytes")), _gb(m.get("rss_budget_bytes"))])
    lines += _table(["context", "tokens/s", "weights/token", "KV cache/token", "KV share of bytes", "ceiling tok/s",
                     "of ceiling", "attention share of time", "HF f32 tok/s", "vs HF f32", "peak RSS", "RSS budget"], rows) + [""]
    lines += _kv_dtypes_section(M, plan, t)

    lines += [f"## Backends and threads ({plan.headline})", ""]
    rows = []
    base, last = f"qwen-ref/{{}}/{plan.headline}", f"prefill-{plan.prefill_prompts[-1]}"
    for name in dict.fromkeys([f"{base.format('numba')}/decode/{t}", f"{base.format('numpy')}/decode/{t}",
                               f"{base.format('numba')}/decode/1t", f"{base.format('numba')}/{last}/{t}",
                               f"{base.format('numba')}/{last}/1t"]):
        m = M.get(name)
        if m:
            rows.append([f"`{name}`", _range(m) + _busy(m), _f(m.get("ceiling")), _pct(m.get("fraction_of_ceiling")),
                         _x(m.get("vs_transformers_float32"))])
    lines += _table(["measurement", "tokens/s", "ceiling tok/s", "of ceiling", "vs HF f32 (same threads)"], rows) + [""]
    nb, npy = M.get(f"qwen-ref/numba/{plan.headline}/decode/{t}"), M.get(f"qwen-ref/numpy/{plan.headline}/decode/{t}")
    if nb and npy and "error" not in nb and "error" not in npy:
        lines += [f"numba / numpy decode: **{nb['median'] / npy['median']:.1f}x**.", ""]
    for work in ("decode", f"prefill-{plan.prefill_prompts[-1]}"):
        one, many = M.get(f"qwen-ref/numba/{plan.headline}/{work}/1t"), M.get(f"qwen-ref/numba/{plan.headline}/{work}/{t}")
        if threads > 1 and one and many and "error" not in one and "error" not in many:
            lines += [f"{work}: {threads} threads / 1 thread = **{many['median'] / one['median']:.2f}x**.", ""]

    lines += _ttft_section(M, plan, t)
    lines += _paired_section(results.get("paired", {}), results.get("paired_fractions", {}), plan)
    lines += _profile_section(M, plan, t)
    lines += ["## Method", "",
              "- Each workload runs in a fresh subprocess after a warm-up (JIT from the on-disk cache, page cache, "
              "thread pools); peak RSS is that subprocess's `ru_maxrss` from `os.wait4` (memory-mapped weights count "
              "once their pages are touched).",
              "- Checkpoints: random weights in the exact Qwen1.5 shapes, written by `tools/make_checkpoint.py`. "
              "Each run first evicts them from the page cache (`posix_fadvise(DONTNEED)`), so the first workload "
              "of a model reads it from disk as a user's run would: pages read from disk come in large folios "
              "that qwen-ref maps as 2 MB pages, while pages just written stay 4 KB ones (24-26 GB/s instead of "
              "31-33 measured for a streaming read here).",
              "- transformers: `Qwen2ForCausalLM.from_pretrained(dir, dtype=...)` with its default attention "
              f"implementation ({_attn(M)}); decode is a loop of `model(input_ids=token, cache=DynamicCache)` with "
              "argmax, which is what `generate()` does minus its bookkeeping; prefill passes `logits_to_keep=1`.",
              "- The RSS budget is the checkpoint's size + the KV caches allocated for the run (float32, or one of "
              "each dtype where a workload compares them) + 300 MB.",
              "- ⚠ marks a measurement during which other processes used that many cores (from /proc/stat); "
              "`steal_cores` in results.json is what the hypervisor took.", ""]
    return "\n".join(lines)


def _loaded_lines(M: dict) -> list[str]:
    """Which prefill GEMM the qwen-ref workloads ran, and how warm their checkpoints were when they loaded."""
    gemms = defaultdict(list)
    for m in M.values():
        if m.get("prefill_gemm"):
            gemms[f"{m['prefill_gemm']} ({m['prefill_gemm_reason']})"].append(m)
    loaded = [m["page_cache_at_load"] for m in M.values() if m.get("page_cache_at_load") is not None]
    lines = []
    if gemms:
        lines += ["**Prefill GEMM** (`jitkernels.choice`): " + "; ".join(
            f"{g} in {len(ms)} measurements" for g, ms in gemms.items()) + ".", ""]
    if loaded:
        cold = sum(x < 0.99 for x in loaded)
        lines += [f"**Page cache**: the checkpoint was fully in the page cache when {len(loaded) - cold} of "
                  f"{len(loaded)} workloads loaded it, partly or not in {cold} (each run first evicts its "
                  "checkpoints; a workload's untimed warm-up reads what is missing before its timed repeats). "
                  "`page_cache_at_load` in results.json.", ""]
    return lines


def _ttft_section(M: dict, plan: Plan, t: str) -> list[str]:
    found = {m["page_cache"]: m for m in M.values() if m.get("kind") == "ttft" and "error" not in m}
    if not found:
        return []
    rows = []
    for state in ("cold", "warm"):
        m = found.get(state)
        if m:
            before = [x for x in m.get("page_cache_before", []) if x is not None]
            rows.append([state, _range(m) + _busy(m), _pct(float(np.median(before))) if before else "—",
                         _f(_median(m.get("cli_load_seconds"))), _f(_median(m.get("cli_prompt_tokens_per_s"))),
                         _f(_median(m.get("cli_first_token_seconds"))), str(m["repeats"])])
    lines = [f"## Time to first token ({plan.headline}, {plan.prompt}-token prompt)", "",
             "`qwen-ref generate --max-new-tokens 1` in a fresh process, seconds from its launch to the first token on "
             "its stdout: interpreter start-up, imports, kernels from the JIT cache, load, and a prefill that reads "
             "from disk whatever of the checkpoint the page cache lacks. cold: the checkpoint evicted first "
             "(`posix_fadvise(DONTNEED)`; these hosts trim an idle page cache within minutes), warm: the same "
             "command right after. Only the checkpoint is evicted (Python, the libraries and the JIT cache stay "
             "cached). Rounds alternate cold and warm; the command's own timings line is parsed beside: load "
             "(mapping, not reading, the weights), the prompt's tokens/s (a cold prompt's time includes the reads) "
             "and its first-token time.", ""]
    lines += _table(["checkpoint", "first token, s", "in page cache before", "load, s (its stderr)",
                     "prompt tok/s (its stderr)", "first token, s (its stderr)", "rounds"], rows) + [""]
    if {"cold", "warm"} <= set(found):
        lines += [f"cold / warm: **{found['cold']['median'] / found['warm']['median']:.2f}x** the time to the first "
                  "token.", ""]
    return lines


def _median(values: list | None) -> float | None:
    values = [v for v in values or [] if v is not None]
    return float(np.median(values)) if values else None


def _attn(M: dict) -> str:
    found = {m.get("attn_implementation") for m in M.values() if m.get("attn_implementation")}
    return ", ".join(sorted(found)) or "?"


def _paired_section(ratios: dict[str, dict], fractions: dict[str, dict], plan: Plan) -> list[str]:
    if not ratios and not fractions:
        return []
    lines = [f"## Paired rounds ({plan.headline})", "",
             "The targets' workloads again at the end of the run, round after round. In each round qwen-ref decodes "
             "(at the longest context, then at the prompt's) between two streaming reads, and transformers decodes "
             "right after; qwen-ref's prefills (each prompt length, each followed by transformers') run between two GEMM "
             "runs. A fraction "
             "or ratio from one round compares figures measured within a minute, under the same state of the host "
             "(which drifts by 15% or more over a run); the targets use the median over the rounds.", ""]
    if any(x.get("beside") for p in fractions.values() for x in p["rounds"]):
        lines += [("The decodes also read the streaming ceiling (float32, and bfloat16 for the bf16 bound) in their "
                   "own process just before and just after each repeat: each repeat is judged against the higher of "
                   "those two readings, seconds away, and a round's figures are the medians over its repeats "
                   "(ceilings: the median of those higher readings). The columns 'a minute apart' judge the same "
                   "decode against the round's separate streaming reads instead (the higher of the two): the method "
                   "for results without in-process readings."), ""]
    notes = []
    for work, p in fractions.items():
        unit = "GB/s" if work.startswith("decode") else "GFLOP/s"
        beside = _beside_label(p["rounds"])
        header = ["round", "qwen-ref tok/s", f"ceiling {unit} ({beside})", "ceiling tok/s", "of ceiling"]
        rows = [[str(x["round"]), _f(x["qwen_ref"]), _f(x["ceiling_rate"]), _f(x["ceiling"]), _pct(x["fraction"])]
                for x in p["rounds"]]
        rows.append(["**median**", "", "", "", f"**{_pct(p['median'])}**"])
        if "median_apart_fraction" in p:  # the same decode against the round's separate reads
            header += [f"ceiling {unit} a minute apart", "of that ceiling"]
            for row, x in zip(rows, p["rounds"]):
                row += [_f(x.get("apart_rate")), _pct(x.get("apart_fraction"))]
            rows[-1] += ["", f"**{_pct(p['median_apart_fraction'])}**"]
        if "median_bound_of_ceiling" in p:  # the bfloat16 bound beside the ceiling
            header += [f"bf16 read GB/s ({beside})", "bf16 bound tok/s", "bound / ceiling", "of bf16 bound"]
            for row, x in zip(rows, p["rounds"]):
                row += [_f(x.get("bf16_rate")), _f(x.get("bf16_bound")), _pct(x.get("bound_of_ceiling")),
                        _pct(x.get("fraction_of_bound"))]
            rows[-1] += ["", "", f"**{_pct(p['median_bound_of_ceiling'])}**", f"**{_pct(p['median_fraction_of_bound'])}**"]
            beaten = [str(x["round"]) for x in p["rounds"] if x.get("fraction_of_bound", 0) > 1]
            if beaten:  # the bound's own loop compiled worse than the GEMV's, or the host changed between them
                notes.append(f"{work}: qwen-ref beat the bf16 bound in round {', '.join(beaten)}: it was no bound there.")
        lines += [f"{work}: qwen-ref against the ceiling beside it", ""]
        lines += _table(header, rows) + [""]
    if any("median_bound_of_ceiling" in p for p in fractions.values()):
        lines += ["bf16 bound: the tokens/s of a step that read its bfloat16 weights at the `anon-bf16` speed (at most "
                  "the streaming read's) and its float32 KV cache at the streaming read's, both read beside the decode; "
                  "bound / ceiling is the highest fraction of the ceiling that kernels widening bfloat16 as qwen-ref's "
                  "do could reach then.", *notes, ""]
    for work, p in ratios.items():
        rows = [[str(x["round"]), _f(x["qwen_ref"]), _f(x["transformers"]), _x(x["ratio"])] for x in p["rounds"]]
        rows.append(["**median**", "", "", f"**{_x(p['median'])}**"])
        lines += [f"{work}: qwen-ref against transformers float32, tokens/s", ""]
        lines += _table(["round", "qwen-ref", "transformers float32", "ratio"], rows) + [""]
    return lines


def _beside_label(rounds: list[dict]) -> str:
    """How the ceilings of these paired rounds were read (a run merged by --only may mix the two)."""
    read_beside = [bool(x.get("beside")) for x in rounds]
    if all(read_beside):
        return "beside each repeat"
    return "higher of the two" if not any(read_beside) else "beside each repeat where read, else higher of the two"


def _profile_section(M: dict, plan: Plan, t: str) -> list[str]:
    decode = [M.get(f"profile/numba/{plan.headline}/decode-ctx-{ctx}/{t}") for ctx in plan.contexts]
    decode = [m for m in decode if m and "ops" in m]
    if not decode:
        return []
    lines = [f"## Where a decode step's time goes ({plan.headline}, numba)", "",
             "Each backend operation wrapped in a timer (a timed model runs a decode step's operations one by one, "
             "not in one call as it otherwise does: its steps are slower than the decode tables' and its 'outside "
             "the ops' row includes Python that those do not pay); ms per token summed over the layers, and the bandwidth "
             "(weight or KV bytes read / time) each achieved. Median step: "
             + ", ".join(f"{_f(m['median'])} ms at {m['context']}" for m in decode) + ".", ""]
    labels = list(dict.fromkeys(label for m in decode for label in m["ops"]))
    rows = [["**all weight matrices**"]]
    for m in decode:  # how close the matrix-vector products as a whole come to the streaming bandwidth
        mats = [op for label, op in m["ops"].items() if label.endswith("proj") or label.startswith("lm_head")]
        ms, gb = sum(op["ms"] for op in mats), sum(op["ms"] * op["GB/s"] / 1e3 for op in mats)
        rows[0].append(f"{_f(ms)} ms, {_pct(sum(op['share'] for op in mats))}, {_f(gb / ms * 1e3)} GB/s")
    for label in labels:
        row = [label]
        for m in decode:
            op = m["ops"].get(label, {})
            gbs = op.get("GB/s") if op.get("GB/s", 0) > 0 and label not in ("rms_norm", "apply_rope") else None
            row.append(f"{_f(op.get('ms'))} ms, {_pct(op.get('share'))}" + (f", {_f(gbs)} GB/s" if gbs else ""))
        rows.append(row)
    lines += _table(["op", *[f"context {m['context']}" for m in decode]], rows) + [""]
    pre = M.get(f"profile/numba/{plan.headline}/prefill-{plan.prefill_prompts[-1]}/{t}")
    if pre and "ops" in pre:
        lines += [f"Prefill of {pre['prompt']} tokens by op ({_f(pre['median'])} ms in all):", ""]
        rows = [[label, _f(op["ms"]), _pct(op["share"]), _f(op.get("GFLOP/s")) if op.get("GFLOP/s") else ""]
                for label, op in pre["ops"].items()]
        lines += _table(["op", "ms", "share", "GFLOP/s"], rows) + [""]
    return lines
