"""The figures tools/bench.py derives from its measurements: the bytes a decode step reads and the
FLOPs a prefill token costs (arithmetic on a checkpoint's config), the ceilings they imply on this
machine, fractions of those ceilings, ratios to transformers, and the targets the project is judged on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_plan import Plan

ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "bfloat16": 2, "float32": 4}
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
    """Add ceiling, fraction_of_ceiling and ratios to transformers to every model measurement, in place."""
    for name, m in measurements.items():
        if "error" in m or m["kind"] not in ("qwen_decode", "qwen_prefill", "hf_decode", "hf_prefill"):
            continue
        if name.startswith("paired/"):  # read by paired_ratios
            continue
        impl, variant, model, work, threads = name.split("/")
        if impl == "transformers":  # ".../float32/0.5b/...": loaded from the bf16 checkpoint, computes in `variant`
            shape, stored, compute = model, "bf16", {"float32": "f32", "bfloat16": "bf16"}[variant]
        else:  # ".../numba/0.5b-bf16/...": computes on the stored weights
            (shape, stored), compute = model.split("-"), model.split("-")[1]
        f = facts.get(f"{shape}-{stored}")
        if f is None:
            continue
        if work.startswith("decode"):
            bw = bandwidth_ceiling(measurements, threads)
            cache_itemsize = 4 if impl == "qwen-ref" else ITEMSIZE[compute]
            need = decode_bytes(f, ITEMSIZE[compute], cache_itemsize, mean_keys(m))
            m["bytes_per_token"] = need
            if bw:
                m["ceiling_bandwidth_GBps"] = bw
                m["ceiling"] = bw * 1e9 / need["total"]
            if impl == "qwen-ref":
                spec = m["spec"]  # the cache generate() allocates, or the one filled for a context run
                capacity = (spec["prompt"] if spec["context"] is None else spec["context"]) + spec["new_tokens"]
                kv = f["kv_values_per_token"] * 4 * capacity
                m["rss_budget_bytes"] = f["checkpoint_bytes"] + kv + 300 * MB
                m["kv_cache_bytes"] = kv
        else:
            P = m["spec"]["prompt"]
            gemm = gemm_ceiling(measurements, shape, P, threads)
            m["flops_per_token"] = prefill_flops_per_token(f, P)
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
    """Per work ("decode", "prefill-P"): qwen-ref / transformers float32 in each paired round, and their median."""
    shape = plan.headline.split("-")[0]
    out = {}
    for work in ("decode", f"prefill-{plan.prefill_prompts[-1]}"):
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


def paired_fractions(measurements: dict[str, dict], facts: dict[str, dict], plan: Plan, threads: int) -> dict[str, dict]:
    """Per work ("decode", "decode-ctx-C", "prefill-P"): qwen-ref's fraction of the ceiling measured in the same
    paired round (the higher of the streaming reads, or of the GEMM runs, on either side of it), and their median."""
    shape = plan.headline.split("-")[0]
    f = facts.get(plan.headline)
    P, out = plan.prefill_prompts[-1], {}
    for work in ("decode", f"decode-ctx-{plan.contexts[-1]}", f"prefill-{P}"):
        rounds = []
        for r in range(1, plan.paired_rounds + 1):
            ours = measurements.get(f"paired/{r}/qwen-ref/numba/{plan.headline}/{work}/{threads}t")
            if work.startswith("decode"):
                labels, unit = [f"paired/{r}/ceiling/{b}/anon/{threads}t" for b in ("bandwidth", "bandwidth-after")], "GB/s"
            else:
                labels, unit = [f"paired/{r}/ceiling/{g}/{shape}/T{P}/{threads}t" for g in ("gemm", "gemm-after")], "GFLOP/s"
            found = [measurements.get(label) for label in labels]
            found = [m["median"] for m in found if m and "error" not in m]
            if f is None or not ours or "error" in ours or not found:
                continue
            if work.startswith("decode"):  # the cache is float32 in qwen-ref
                per_token = decode_bytes(f, ITEMSIZE[plan.headline.split("-")[1]], 4, mean_keys(ours))["total"]
            else:
                per_token = prefill_flops_per_token(f, P)
            ceiling = max(found) * 1e9 / per_token
            rounds.append({"round": r, "qwen_ref": ours["median"], "ceiling_rate": max(found), "unit": unit,
                           "ceiling": ceiling, "fraction": ours["median"] / ceiling})
        if rounds:
            out[work] = {"rounds": rounds, "median": float(np.median([x["fraction"] for x in rounds]))}
    return out


def targets(measurements: dict[str, dict], plan: Plan, threads: int, paired: dict[str, dict],
            fractions: dict[str, dict]) -> list[dict]:
    """The figures the project is judged on, each with its threshold and whether it is met.

    Each is the median of the paired rounds when the run has them (the ratios to transformers, and the
    fractions of the ceiling measured beside the workload); else the main list's figure."""
    base = f"qwen-ref/numba/{plan.headline}"
    model, P, ctx = plan.headline, plan.prefill_prompts[-1], plan.contexts[-1]

    def figure(work: str, paired_figures: dict, key: str) -> tuple[str, float | None, float | None]:
        """(how it was measured, the figure the target uses, the main list's figure)"""
        main = measurements.get(f"{base}/{work}/{threads}t", {}).get(key)
        if work in paired_figures:
            return f" (median of {len(paired_figures[work]['rounds'])} paired rounds)", paired_figures[work]["median"], main
        return "", main, main

    decode_x, prefill_x = figure("decode", paired, "vs_transformers_float32"), figure(
        f"prefill-{P}", paired, "vs_transformers_float32")
    decode_of, prefill_of, long_of = (
        figure(w, fractions, "fraction_of_ceiling") for w in ("decode", f"prefill-{P}", f"decode-ctx-{ctx}"))
    rows = [
        (f"decode {model}, {plan.prompt}-token prompt: fraction of the decode ceiling", decode_of, 0.90, ">="),
        (f"decode {model}, {plan.prompt}-token prompt: x transformers float32", decode_x, 3.0, ">="),
        (f"prefill {model}, {P}-token prompt: fraction of the prefill ceiling", prefill_of, 0.60, ">="),
        (f"prefill {model}, {P}-token prompt: x transformers float32", prefill_x, 1.0, ">"),
        (f"decode {model} at context {ctx}: fraction of its ceiling (weights + KV cache)", long_of, 0.80, ">="),
    ]
    out = [{"target": t + how, "value": v, "main_list": main, "threshold": th, "op": op,
            "met": None if v is None else (v >= th if op == ">=" else v > th)} for t, (how, v, main), th, op in rows]
    over = [n for n, m in measurements.items() if m.get("rss_budget_bytes") and m["kind"] == "qwen_decode"
            and m["spec"].get("backend") == "numba" and m["peak_rss_bytes"] > m["rss_budget_bytes"]]
    have = [m for m in measurements.values() if m.get("rss_budget_bytes") and m["spec"].get("backend") == "numba"]
    out.append({"target": "decode peak RSS <= checkpoint + KV cache + 300 MB (every numba decode run)",
                "value": f"{len(have) - len(over)} of {len(have)} within" + (f"; over: {', '.join(over)}" if over else ""),
                "threshold": None, "op": None, "met": (not over) if have else None})
    return out
