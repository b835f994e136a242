"""One results folder per host kind, and the index that shows them side by side.

A number true of one CPU is not a fact about the code, so tools/bench.py keeps each host's results
apart: benchmarks/hosts/<slug>/results.json and BENCHMARKS.md, the slug made of the CPU's model name
(as lscpu shows it) and a short SIMD class (`amd-epyc-avx2`, `amd-epyc-avx512`,
`intel-xeon-avx512-amx`). A run on a new host adds a folder; a run with --only merges into its own
host's file. benchmarks/BENCHMARKS.md is the index, made from every host's results.json: the hosts,
and each target with its figure, verdict and date on every host that measured it.
"""

from __future__ import annotations

import re

from bench_report import _f, _pct, _table, _x

# SIMD classes, most capable first: the first whose flags a CPU has all of names it
FLAG_CLASSES = (("avx512-amx", ("avx512f", "amx_tile")), ("avx512", ("avx512f",)), ("avx2", ("avx2", "fma")))


def flag_class(flags: list[str]) -> str:
    have = set(flags)
    return next((name for name, need in FLAG_CLASSES if have.issuperset(need)), "x86-64")


def host_slug(model_name: str, flags: list[str]) -> str:
    """`intel-xeon-avx512-amx` from "Intel(R) Xeon(R) Processor" and its flags: the folder of a host kind.
    The model name loses trademarks, "Processor"/"CPU", frequencies and core counts; at most four words stay."""
    name = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|@.*|\d+-core", " ", model_name.lower())
    words = re.findall(r"[a-z0-9]+", name)[:4] or ["unknown"]
    return "-".join([*words, flag_class(flags)])


def host_facts(cpu_model: str, flags: list[str], lscpu: dict | None) -> dict:
    """What names a host kind in its results (besides machine_info's cores, memory, kernel)."""
    lscpu = lscpu or {}
    return {"slug": host_slug(lscpu.get("Model name") or cpu_model, flags), "flag_class": flag_class(flags),
            "vendor": lscpu.get("Vendor ID"), "cpu_family": lscpu.get("CPU family"), "cpu_model_number": lscpu.get("Model")}


def _dates(results: dict) -> str:
    days = sorted({m["measured_at"][:10] for m in results["measurements"].values() if m.get("measured_at")})
    return "—" if not days else days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _gemm(results: dict) -> str:
    """The prefill GEMMs the qwen-ref workloads ran (recorded since the per-host results)."""
    found = sorted({m["prefill_gemm"] for m in results["measurements"].values() if m.get("prefill_gemm")})
    return ", ".join(found) or "not recorded"


def _ttft(results: dict) -> str:
    found = {m.get("page_cache"): m for m in results["measurements"].values() if m.get("kind") == "ttft"
             and "error" not in m}
    if not {"cold", "warm"} <= set(found):
        return "—"
    return (f"{_f(found['cold']['median'])} s / {_f(found['warm']['median'])} s "
            f"({found['cold']['spec']['prompt']} tokens)")


def index_markdown(hosts: dict[str, dict]) -> str:
    """benchmarks/BENCHMARKS.md: every host (slug -> its results.json) side by side."""
    slugs = sorted(hosts)
    lines = ["# qwen-ref benchmarks, every host", "",
             "`python tools/bench.py` measures the host it runs on and writes `hosts/<host>/results.json` and "
             "`hosts/<host>/BENCHMARKS.md` (the tables, the ceilings, the method); this page is made from every "
             "host's results.json (`python tools/bench.py --report` remakes it and the hosts' pages). A host "
             "kind is its CPU model name and SIMD class; a run on a new one adds its folder and leaves the "
             "others alone. The targets must hold on every host kind, each figure from one run on that host.", ""]
    rows = []
    for s in slugs:
        r = hosts[s]
        m = r["machine"]
        fam = "/".join(str(x) for x in (m.get("cpu_family"), m.get("cpu_model_number")) if x) or "?"
        rows.append([f"[{s}](hosts/{s}/BENCHMARKS.md)", m["cpu_model"], fam, m.get("flag_class", "?"),
                     str(m["cores_available"]), f"{m['memory_gb']:.0f} GB", _gemm(r), _ttft(r), _dates(r)])
    lines += ["## Hosts", ""]
    lines += _table(["host", "CPU (model name)", "family/model", "SIMD", "cores", "memory", "prefill GEMM that ran",
                     "first token, cold / warm", "measured"], rows) + [""]
    lines += ["First token: `qwen-ref generate` in a fresh process, from its launch to the first token, load and "
              "checkpoint reads included; cold = the checkpoint evicted from the page cache first (see each host's "
              "page). Prefill GEMM: `jitkernels.choice` (`auto`: timed once per CPU).", ""]

    lines += ["## Targets, host by host", "",
              "Each cell: the figure, its verdict, and the date it was measured on that host (— : not measured "
              "there). How each figure is taken is on the host's page (paired rounds: the median over rounds that "
              "measure qwen-ref beside its ceiling and its baseline).", ""]
    names = list(dict.fromkeys(_target_key(tg) for s in slugs for tg in hosts[s].get("targets", [])))
    rows = []
    for name in names:
        found = {s: next((tg for tg in hosts[s].get("targets", []) if _target_key(tg) == name), None) for s in slugs}
        first = next(tg for tg in found.values() if tg)
        threshold = "" if first["threshold"] is None else f"{first['op']} {_fmt(first, first['threshold'])}"
        rows.append([name, threshold, *[_cell(found[s]) for s in slugs]])
    lines += _table(["target", "threshold", *slugs], rows) + [""]
    judged = []
    for name in names:
        on = [s for s in slugs if (tg := next((t for t in hosts[s].get("targets", []) if _target_key(t) == name),
                                               None)) and tg["met"] is not None]
        judged.append(f"- {name}: judged on {', '.join(on) if on else 'no host yet'}.")
    lines += ["Which host each target was judged on:", "", *judged, ""]

    others = {s: sorted(p for p in hosts[s].get("_files", []) if p not in ("BENCHMARKS.md", "results.json"))
              for s in slugs}
    if any(others.values()):
        lines += ["## Other measurements per host", ""]
        lines += [f"- {s}: " + ", ".join(f"[{p}](hosts/{s}/{p})" for p in files) for s, files in others.items() if files]
        lines += [""]
    return "\n".join(lines)


def _target_key(tg: dict) -> str:
    """The target without how it was measured ("(median of 5 paired rounds)"): the same row on every host."""
    return re.sub(r" \((median of|tools/bench_llamacpp)[^)]*\)$", "", tg["target"])


def _fmt(tg: dict, x) -> str:
    if isinstance(x, str):
        return x
    return _x(x) if tg.get("unit") == "ratio" else _pct(x)


def _cell(tg: dict | None) -> str:
    if tg is None or tg["met"] is None:
        return "—"
    verdict = "**met**" if tg["met"] else "**not met**"
    value = _fmt(tg, tg["value"]).split(";")[0]  # the host's page names what is over a budget
    return f"{value} {verdict}" + (f" ({tg['measured']})" if tg.get("measured") else "")
