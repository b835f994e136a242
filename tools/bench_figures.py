"""The figures tools/bench.py derives from its measurements: the bytes a decode step reads and the
FLOPs a prefill token costs (arithmetic on a checkpoint's config), the ceilings they imply on this
machine, fractions of those ceilings, ratios to transformers, and the targets the project is judged on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_plan import Plan

ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
MB = 1e6


# =================================================================================================
# Arithmetic: bytes a decode step reads, FLOPs a prefill token costs


def model_facts(model_dir: Path) -> dict:
    from qwen_ref.config import load_config

    c = load_config(model_dir)
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer_matrix = D * q + 2 * D * kv + q * D + 3 * D * F  # q, k, v, o, gate, up, down
    return {
        "D": D, "F": F, "V": V, "L": L, "H": c.num_attention_heads, "Hkv": c.num_key_value_heads,
        "hd": c.head_dim, "tied": c.tie_word_embeddings,
        "layer_matrix_params": L * layer_matrix,
        "small_params_read": L * (q + 2 * kv + 2 * D) + D,  # biases, two norms per layer, final norm
        "head_params": V * D,  # the LM head (the embedding matrix itself when tied)
        "embedding_row_params": D,
        "kv_values_per_token": 2 * L * kv,  # keys and values of one position, all layers
        "checkpoint_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
    }


def decode_bytes(f: dict, itemsize: int, cache_itemsize: int, mean_keys: float) -> dict:
    """Bytes one decode step reads: every layer matrix, bias and norm, the LM head, one embedding row,
    and the KV cache of `mean_keys` positions (the mean over the timed steps)."""
    weights = (f["layer_matrix_params"] + f["small_params_read"] + f["head_params"] + f["embedding_row_params"])
    kv = f["kv_values_per_token"] * cache_itemsize * mean_keys
    return {"weights": weights * itemsize, "kv_cache": kv, "total": weights * itemsize + kv}


def prefill_flops_per_token(f: dict, prompt: int) -> float:
    """2 x matrix params, the LM head once per prompt (last position only), and causal attention:
    4 x L x H x hd FLOPs per (query, key) pair, query t seeing t + 1 keys, (P + 1) / 2 on average."""
    return (2 * f["layer_matrix_params"] + 2 * f["head_params"] / prompt
            + 4 * f["L"] * f["H"] * f["hd"] * (prompt + 1) / 2)


def mean_keys(m: dict) -> float:
    """Mean number of cached positions a timed decode step attends to (the new token included)."""
    spec, steps = m["spec"], m["decode_steps"]
    first = spec["prompt"] if spec["context"] is None else spec["context"] + 1  # position of the first timed step
    return first + 1 + (steps - 1) / 2


# =================================================================================================
# Derived figures: ceilings, fractions, ratios, targets


def derive(measurements: dict[str, dict], facts: dict[str, dict]) -> None:
    """Add what a token costs (bytes read, or FLOPs) to every model measurement, in place; outside the paired
    rounds, whose ceilings are the ones measured beside them (`paired_fractions`), also the ceiling, the
    fraction of it, the RSS budget and the ratios to transformers."""
    for name, m in measurements.items():
        if "error" in m or m["kind"] not in ("qwen_decode", "qwen_prefill", "hf_decode", "hf_prefill"):
            continue
        impl, variant, model, work, threads = name.split("/")[-5:]  # after "paired/<round>/" in a paired round
        if impl == "transformers":  # ".../float32/0.5b/...": loaded from the bf16 checkpoint, computes in `variant`
            shape, stored, compute = model, "bf16", {"float32": "f32", "bfloat16": "bf16"}[variant]
        else:  # ".../numba/0.5b-bf16/...": computes on the stored weights
            (shape, stored), compute = model.split("-"), model.split("-")[1]
        f = facts.get(f"{shape}-{stored}")
        if f is None:
            continue
        if work.startswith("decode"):
            # qwen-ref's cache: its --kv-dtype (float32 unless the workload names one); transformers': the model dtype
            cache_itemsize = ITEMSIZE[m.get("kv_dtype", "float32")] if impl == "qwen-ref" else ITEMSIZE[compute]
            m["bytes_per_token"] = decode_bytes(f, ITEMSIZE[compute], cache_itemsize, mean_keys(m))
        else:
            m["flops_per_token"] = prefill_flops_per_token(f, m["spec"]["prompt"])
        if name.startswith("paired/"):
            continue
        if work.startswith("decode"):
            bw = bandwidth_ceiling(measurements, threads)
            if bw:
                m["ceiling_bandwidth_GBps"] = bw
                m["ceiling"] = bw * 1e9 / m["bytes_per_token"]["total"]
            if impl == "qwen-ref":
                spec = m["spec"]  # the cache generate() allocates, or the one filled for a context run
                capacity = (spec["prompt"] if spec["context"] is None else spec["context"]) + spec["new_tokens"]
                dtypes = spec.get("kv_dtypes", ["float32"])  # every cache the process holds, one per dtype
                kv = f["kv_values_per_token"] * capacity * sum(ITEMSIZE[d] for d in dtypes)
                m["rss_budget_bytes"] = f["checkpoint_bytes"] + kv + 300 * MB
                m["kv_cache_bytes"] = kv
        else:
            gemm = gemm_ceiling(measurements, shape, m["spec"]["prompt"], threads)
            if gemm:
                m["ceiling_gflops"] = gemm
                m["ceiling"] = gemm * 1e9 / m["flops_per_token"]
        if "ceiling" in m:
            m["fraction_of_ceiling"] = m["median"] / m["ceiling"]
        if impl == "qwen-ref":
            for torch_dtype in ("float32", "bfloat16"):
                ref = measurements.get(f"transformers/{torch_dtype}/{shape}/{work}/{threads}")
                if ref and "error" not in ref:
                    m[f"vs_transformers_{torch_dtype}"] = m["median"] / ref["median"]


def bandwidth_ceiling(measurements: dict[str, dict], threads: str) -> float | None:
    """GB/s of the decode ceilings: the higher median of the streaming reads at the start and end of the run."""
    found = [measurements.get(f"ceiling/{label}/anon/{threads}") for label in ("bandwidth", "bandwidth-end")]
    found = [m["median"] for m in found if m and "error" not in m]
    return max(found) if found else None


def gemm_ceiling(measurements: dict[str, dict], shape: str, prompt: int, threads: str) -> float | None:
    """GFLOP/s of the prefill ceilings: the higher median of the BLAS runs at the start and end of the run
    (the end run has the run's thread count only)."""
    found = [measurements.get(f"ceiling/{label}/{shape}/T{prompt}/{threads}") for label in ("gemm", "gemm-end")]
    found = [m["median"] for m in found if m and "error" not in m]
    return max(found) if found else None


def paired_ratios(measurements: dict[str, dict], plan: Plan, threads: int) -> dict[str, dict]:
    """Per work ("decode", "prefill-P" for each P): qwen-ref / transformers float32 in each paired round, and
    their median."""
    shape = plan.headline.split("-")[0]
    out = {}
    for work in ("decode", *[f"prefill-{P}" for P in plan.prefill_prompts]):
        rounds = []
        for r in range(1, plan.paired_rounds + 1):
            ours = measurements.get(f"paired/{r}/qwen-ref/numba/{plan.headline}/{work}/{threads}t")
            theirs = measurements.get(f"paired/{r}/transformers/float32/{shape}/{work}/{threads}t")
            if ours and theirs and "error" not in ours and "error" not in theirs:
                rounds.append({"round": r, "qwen_ref": ours["median"], "transformers": theirs["median"],
                               "ratio": ours["median"] / theirs["median"]})
        if rounds:
            out[work] = {"rounds": rounds, "median": float(np.median([x["ratio"] for x in rounds]))}
    return out


def paired_fractions(measurements: dict[str, dict], plan: Plan, threads: int) -> dict[str, dict]:
    """Per work ("decode", "decode-ctx-C", "prefill-P" for each P): qwen-ref's tokens/s over the ceiling measured beside
    it in each paired round, and the median of those fractions.

    A decode that read the ceiling in its own process around each repeat ("beside", see
    bench_workers.ceiling_reads) is judged repeat by repeat against the higher of the readings just before
    and after it, and the round's figures are medians over its repeats; the round's separate reads, a
    minute away, are kept beside as `apart_rate` and `apart_fraction`. Otherwise (prefill; results of older
    runs) the ceiling is the higher median of the round's runs around the workload (`_ceiling_beside`).

    For a bfloat16 headline's decodes also the bfloat16 bound: tokens/s if the weights were read at the
    speed of the bfloat16 read beside them (`anon-bf16`, never above the streaming read's) and the KV cache
    (float32) at the streaming read's. `bound_of_ceiling` is then the highest fraction of the ceiling that
    kernels widening bfloat16 as qwen-ref's do could reach in that round."""
    out = {}
    for work in ("decode", f"decode-ctx-{plan.contexts[-1]}", *[f"prefill-{P}" for P in plan.prefill_prompts]):
        decode_bf16 = work.startswith("decode") and plan.headline.endswith("-bf16")
        rounds = []
        for r in range(1, plan.paired_rounds + 1):
            ours = measurements.get(f"paired/{r}/qwen-ref/numba/{plan.headline}/{work}/{threads}t", {})
            cost = ours.get("bytes_per_token", {}).get("total") or ours.get("flops_per_token")  # set by derive()
            apart = _ceiling_beside(measurements, plan, r, work, threads)
            if not cost or not (apart or "beside" in ours):
                continue
            if "beside" in ours:
                tok_s, rates, bf16 = ours["values"], _higher_reads(ours, "anon"), _higher_reads(ours, "anon-bf16")
            else:
                tok_s, rates = [ours["median"]], [apart]
                bf16 = [_ceiling_beside(measurements, plan, r, work, threads, "anon-bf16") if decode_bf16 else None]
            x = _round_figures(tok_s, rates, bf16 if decode_bf16 and all(bf16) else None, cost,
                               ours.get("bytes_per_token"))
            x["round"], x["beside"] = r, "beside" in ours
            if "beside" in ours and apart:
                x["apart_rate"], x["apart_fraction"] = apart, ours["median"] / (apart * 1e9 / cost)
            rounds.append(x)
        if rounds:
            out[work] = {"rounds": rounds, "median": float(np.median([x["fraction"] for x in rounds]))}
            for key in ("apart_fraction", "bound_of_ceiling", "fraction_of_bound"):
                have = [x[key] for x in rounds if key in x]  # all rounds, unless --only merged older results
                if have:
                    out[work][f"median_{key}"] = float(np.median(have))
            if "median_bound_of_ceiling" in out[work]:
                out[work]["bound_rounds"] = sum("bf16_bound" in x for x in rounds)
    return out


def _higher_reads(ours: dict, kind: str) -> list[float]:
    """Per kept repeat of a decode that read its ceiling beside it: the higher of the readings of `kind`
    ("anon", "anon-bf16") just before and just after the repeat, GB/s."""
    return [max(x["before"][kind], x["after"][kind]) for x in ours["beside"]]


def _round_figures(tok_s: list[float], rates: list[float], bf16_rates: list[float] | None, cost: float,
                   bytes_per_token: dict | None) -> dict:
    """One paired round: each value of tok_s against the ceiling of its rate (GB/s or GFLOP/s; tokens/s =
    rate / cost per token), and medians over them. With bf16_rates (decodes of a bfloat16 model) also the
    bfloat16 bound of each value: its weights (`bytes_per_token["weights"]`) read at the bf16 rate, never
    above the stream's, and its KV cache at the stream's."""
    ceilings = [rate * 1e9 / cost for rate in rates]
    x = {"qwen_ref": float(np.median(tok_s)), "ceiling_rate": float(np.median(rates)),
         "ceiling": float(np.median(ceilings)), "fraction": float(np.median([v / c for v, c in zip(tok_s, ceilings)]))}
    if bf16_rates:
        b = bytes_per_token
        bounds = [1e9 / (b["weights"] / min(f, rate) + b["kv_cache"] / rate) for f, rate in zip(bf16_rates, rates)]
        x["bf16_rate"], x["bf16_bound"] = float(np.median(bf16_rates)), float(np.median(bounds))
        # at most 1 by construction; where the bf16 read is the faster, bound and ceiling are the same
        # figure computed in two orders, and their ratio can land one rounding unit above 1
        x["bound_of_ceiling"] = float(np.median([min(1.0, bound / c) for bound, c in zip(bounds, ceilings)]))
        x["fraction_of_bound"] = float(np.median([v / bound for v, bound in zip(tok_s, bounds)]))
    return x


def _ceiling_beside(measurements: dict[str, dict], plan: Plan, r: int, work: str, threads: int,
                    kind: str = "anon") -> float | None:
    """The higher median of paired round r's streaming reads (GB/s; of `kind`) around its decodes, or of its
    GEMM runs (GFLOP/s) around its prefill."""
    if work.startswith("decode"):
        names = [f"paired/{r}/ceiling/{label}/{kind}/{threads}t" for label in ("bandwidth", "bandwidth-after")]
    else:
        shape, P = plan.headline.split("-")[0], work.removeprefix("prefill-")
        names = [f"paired/{r}/ceiling/{label}/{shape}/T{P}/{threads}t" for label in ("gemm", "gemm-after")]
    found = [measurements[n]["median"] for n in names if n in measurements and "error" not in measurements[n]]
    return max(found) if found else None


def targets(measurements: dict[str, dict], plan: Plan, threads: int, ratios: dict[str, dict],
            fractions: dict[str, dict], llamacpp: dict[str, float] | None = None) -> list[dict]:
    """The figures the project is judged on (issue 21's), each with its threshold and whether it is met.

    Each is the median over the paired rounds when the run has them (`ratios` to transformers from
    `paired_ratios`, `fractions` of the ceiling or of the bfloat16 bound from `paired_fractions`), else the
    main list's figure. `llamacpp`: qwen-ref / llama.cpp per work ("decode", "prefill-P"), measured by
    tools/bench_llamacpp.py on the same host; a target without its figure is "not measured"."""
    base = f"qwen-ref/numba/{plan.headline}"
    model, ctx = plan.headline, plan.contexts[-1]

    def measured(names: list[str]) -> str | None:
        """The day of the latest of these measurements."""
        days = [measurements[n].get("measured_at", "")[:10] for n in names if n in measurements]
        return max(days) if any(days) else None

    def figure(work: str, paired: dict, key: str | None, paired_key: str = "median") -> tuple:
        """(how it was measured, the figure the target uses, the main list's figure, the day it was measured)"""
        name = f"{base}/{work}/{threads}t"
        main = measurements.get(name, {}).get(key) if key else None
        if paired_key in paired.get(work, {}):
            rounds = paired[work]["rounds"]
            how = f" (median of {len(rounds)} paired {'rounds' if len(rounds) > 1 else 'round'})"
            return how, paired[work][paired_key], main, measured([f"paired/{x['round']}/{name}" for x in rounds])
        return "", main, main, measured([name])

    def llama(work: str) -> tuple:
        ratio = (llamacpp or {}).get(work)
        how = "" if ratio is None else " (tools/bench_llamacpp.py, median of alternating rounds)"
        return how, ratio, None, (llamacpp or {}).get("measured")

    decode = f"decode {model}, {plan.prompt}-token prompt"
    rows = [(f"{decode}: fraction of the bfloat16 bound (anon-bf16 read)",
             figure("decode", fractions, None, "median_fraction_of_bound"), 0.90, ">=", "fraction"),
            (f"{decode}: x transformers float32", figure("decode", ratios, "vs_transformers_float32"), 3.0, ">=", "ratio"),
            (f"{decode}: x llama.cpp bf16", llama("decode"), 1.0, ">=", "ratio")]
    for P in plan.prefill_prompts:
        prefill = f"prefill {model}, {P}-token prompt"
        rows += [(f"{prefill}: fraction of the GEMM ceiling",
                  figure(f"prefill-{P}", fractions, "fraction_of_ceiling"), 0.70, ">=", "fraction"),
                 (f"{prefill}: x transformers float32",
                  figure(f"prefill-{P}", ratios, "vs_transformers_float32"), 1.2, ">=", "ratio"),
                 (f"{prefill}: x llama.cpp bf16", llama(f"prefill-{P}"), 1.0, ">=", "ratio")]
    rows.append((f"decode {model} at context {ctx}: fraction of its ceiling (weights + KV cache)",
                 figure(f"decode-ctx-{ctx}", fractions, "fraction_of_ceiling"), 0.80, ">=", "fraction"))
    out = [{"target": t + how, "value": v, "main_list": main, "threshold": th, "op": op, "unit": unit, "measured": day,
            "met": None if v is None else (v >= th if op == ">=" else v > th)}
           for t, (how, v, main, day), th, op, unit in rows]
    over = [n for n, m in measurements.items() if m.get("rss_budget_bytes") and m["kind"] == "qwen_decode"
            and m["spec"].get("backend") == "numba" and m["peak_rss_bytes"] > m["rss_budget_bytes"]]
    have = [m for m in measurements.values() if m.get("rss_budget_bytes") and m["spec"].get("backend") == "numba"]
    out.append({"target": "decode peak RSS <= checkpoint + KV cache + 300 MB (every numba decode run)",
                "value": f"{len(have) - len(over)} of {len(have)} within" + (f"; over: {', '.join(over)}" if over else ""),
                "threshold": None, "op": None, "unit": None, "met": (not over) if have else None,
                "measured": max((m.get("measured_at", "")[:10] for m in have), default=None)})
    return out
