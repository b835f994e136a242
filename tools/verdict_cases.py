"""The cases behind `qwen-ref compare`'s verdict: what an exact engine, a 16-bit KV cache, bf16 activations
and two real bugs do to the logits, and the verdict each gets.

    python tools/make_checkpoint.py --shape 0.5b --dtype float32 --out /tmp/q05
    python tools/verdict_cases.py --model /tmp/q05 --positions 64   # benchmarks/verdict_cases.md
    python tools/verdict_cases.py --fixtures                        # every committed fixture, seconds

Each case runs the same prompt twice in one forward pass from an empty cache, a reference and the run
under test:
    exact            numpy backend (BLAS) against numba kernels, float32 weights and cache: float32 reordering
    kv-float16       --kv-dtype float16 against the float32 cache (llama.cpp's default f16 cache)
    kv-bfloat16      --kv-dtype bfloat16 against the float32 cache
    bf16-activations weights rounded to bf16 on both sides; the run under test also rounds every projection's
                     input to bf16 (qwen_ref.emulate, as llama.cpp's bf16 matmuls do)
    bug-k-bias       the k_proj bias of layer 0 dropped (a loader that misses one tensor)
    k-bias-mid       the same in the middle layer: on a random model smaller than bf16 rounding, so no logit
                     criterion can call it a bug (listed to show that limit; no verdict expected)
    bug-rope-pairs   RoPE rotating neighbouring pairs (2j, 2j+1), llama2.c's layout, not Qwen's (j, j + hd/2)
The first four should come out EXACT, DRIFT, DRIFT, DRIFT and the bugs WRONG (tests/test_verdict.py
checks that on fixtures).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's qwen_ref and jitkernels, whatever is installed

from qwen_ref.backends import Backend, get_backend
from qwen_ref.compare import LogitReport, compare_logits
from qwen_ref.emulate import bf16_activations
from qwen_ref.kv_cache import round_to_kv_dtype
from qwen_ref.model import QwenModel, load_model
from qwen_ref.verdict import Verdict, judge
from qwen_ref.weights import to_float32

FIXTURES = REPO / "tests" / "fixtures"
EXPECTED = {"exact": "EXACT", "kv-float16": "DRIFT", "kv-bfloat16": "DRIFT", "bf16-activations": "DRIFT",
            "bug-k-bias": "WRONG", "k-bias-mid": None, "bug-rope-pairs": "WRONG"}


def rope_neighbour_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """A RoPE bug: rotates elements 2j and 2j+1 together by angle j. x: [T, n, hd]; cos, sin: [T, hd/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]  # [T, n, hd/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, hd/2]
    out = np.empty_like(x)  # [T, n, hd]
    out[..., 0::2], out[..., 1::2] = even * c - odd * s, odd * c + even * s
    return out


def without_k_bias(model: QwenModel, layer: int) -> QwenModel:
    """The model with layer `layer`'s k_proj bias set to zero."""
    name = f"model.layers.{layer}.self_attn.k_proj.bias"
    weights = model.weights | {name: np.zeros_like(model.weights[name])}
    return QwenModel(model.config, weights, model.backend)


def bf16_weights(model: QwenModel, backend: Backend) -> QwenModel:
    """The model with every weight rounded to bfloat16 (a bf16 checkpoint of the same values)."""
    weights = {name: w if w.dtype == np.uint16 else round_to_kv_dtype(to_float32(w), "bfloat16")
               for name, w in model.weights.items()}
    return QwenModel(model.config, weights, backend)


def logits(model: QwenModel, tokens: np.ndarray) -> np.ndarray:
    """All T positions' logits [T, V] in one forward pass from an empty cache."""
    return model.forward(tokens, model.new_cache(len(tokens)))


def run_cases(model_dir: Path, tokens: np.ndarray, only: tuple[str, ...] = tuple(EXPECTED)) -> dict[str, LogitReport]:
    """Every case of the module docstring (or those in `only`) on a checkpoint: its report."""
    numba = get_backend("numba")
    base = load_model(model_dir, numba, layer_major=False)
    ref = logits(base, tokens)  # [T, V] the float32 reference
    runs = {
        "exact": lambda: (logits(QwenModel(base.config, base.weights, get_backend("numpy")), tokens), ref),
        "kv-float16": lambda: (ref, logits(QwenModel(base.config, base.weights, numba, "float16"), tokens)),
        "kv-bfloat16": lambda: (ref, logits(QwenModel(base.config, base.weights, numba, "bfloat16"), tokens)),
        "bf16-activations": lambda: (logits(bf16 := bf16_weights(base, numba), tokens),
                                     logits(QwenModel(bf16.config, bf16.weights, bf16_activations(numba)), tokens)),
        "bug-k-bias": lambda: (ref, logits(without_k_bias(base, 0), tokens)),
        "k-bias-mid": lambda: (ref, logits(without_k_bias(base, base.config.num_hidden_layers // 2), tokens)),
        "bug-rope-pairs": lambda: (ref, logits(QwenModel(base.config, base.weights, dataclasses.replace(
            get_backend("numpy"), apply_rope=rope_neighbour_pairs)), tokens)),
    }
    return {name: compare_logits(*runs[name]()) for name in only}


def row(name: str, report: LogitReport, verdict: Verdict) -> str:
    return (f"| {name} | {verdict.grade.name} | {report.max_abs_ref:.3g} | {report.max_rel_diff:.3g} | "
            f"{report.nmse_mean:.3g} | {report.nmse_max:.3g} | {report.kl_max:.3g} | {report.kl_mean:.3g} | {report.top5_overlap:.3f} | "
            f"{report.argmax_agree}/{report.positions} | {sum(f.near_tie for f in report.flips)} |")


HEADER = ("| case | verdict | max \\|A\\| | max relative | NMSE mean | NMSE max | KL max | KL mean | top-5 overlap | "
          "argmax agree | flips at near-ties |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a float32 checkpoint folder (tools/make_checkpoint.py)")
    source.add_argument("--fixtures", action="store_true", help="every committed fixture, with its own prompt")
    parser.add_argument("--positions", type=int, default=64, help="random prompt length for --model (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="of the random prompt (default: 0)")
    args = parser.parse_args(argv)

    if args.fixtures:
        cases = [(p.name, p, np.load(p / "reference.npz")["prompt_tokens"])
                 for p in sorted(FIXTURES.iterdir()) if (p / "reference.npz").is_file()]
    else:
        vocab = load_model(args.model).config.vocab_size
        cases = [(args.model.name, args.model, np.random.default_rng(args.seed).integers(0, vocab, args.positions))]
    print(HEADER)
    for label, folder, tokens in cases:
        started = time.perf_counter()
        for name, report in run_cases(folder, tokens).items():
            verdict = judge(report)
            mark = "" if EXPECTED[name] in (None, verdict.grade.name) else f"  (expected {EXPECTED[name]})"
            print(row(f"{label} {name}" if args.fixtures else name, report, verdict) + mark, flush=True)
        print(f"{label}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                      platform.processor())
    print(f"\nhost: {model_name}; {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
