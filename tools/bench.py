"""Benchmark qwen-ref against the machine's ceilings and against transformers, in one run.

    python tools/bench.py                                        # the full run: 25 min on a quiet machine
    python tools/bench.py --only 'qwen-ref/numba/0.5b-bf16/*'    # rerun a subset, merged into results.json
    python tools/bench.py --smoke --out /tmp/bench               # a tiny model in seconds: CI runs the script

Writes results.json (every measurement with its median, min, max, repeats and peak resident memory)
and BENCHMARKS.md (tables, fractions of the ceilings, ratios to transformers, the targets) into
--out; the headline table also goes to stdout, progress to stderr. Random-weight checkpoints of the
exact Qwen1.5-0.5B and -1.8B shapes are written once by tools/make_checkpoint.py under
--checkpoints and reused.

Every workload runs in a fresh subprocess (this script with --worker): its peak resident memory is
then its own (os.wait4), and no JIT, BLAS or torch thread-pool state leaks from one to the next.
The machine is shared: each measurement records the CPU that other processes used while it ran.
Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}  # short name (in workload names) -> torch's
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "bfloat16": 2, "float32": 4}
MB = 1e6


# =================================================================================================
# What one run measures


@dataclass(frozen=True)
class Plan:
    """The sizes of one run; `smoke` shrinks every one of them."""

    shapes: tuple[str, ...] = ("0.5b", "1.8b")  # tools/make_checkpoint.py shapes
    dtypes: tuple[str, ...] = ("bf16", "f16", "f32")  # checkpoint storage
    headline: str = "0.5b-bf16"  # the targets' model: also gets the context sweep, numpy, 1-thread and profile runs
    prompt: int = 128  # decode: prompt tokens prefilled before the timed steps
    new_tokens: int = 64  # decode: tokens generated per repeat (the first comes from prefill, untimed)
    slow_new_tokens: int = 32  # decode of 1.8B float32 (qwen-ref's storage, transformers' compute)
    numpy_new_tokens: int = 16  # decode on the numpy backend
    prefill_prompts: tuple[int, ...] = (128, 512)
    contexts: tuple[int, ...] = (128, 1024, 4096, 16384)  # decode with a KV cache this full
    context_new_tokens: int = 32
    hf_context_new_tokens: int = 8  # transformers copies its whole cache every step: 0.5 tokens/s at 16K
    profile_steps: int = 16  # decode steps timed op by op, per repeat
    hf_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # what transformers computes in
    repeats: int = 3
    ceiling_repeats: int = 10
    stream_bytes: int = 2**30  # the bandwidth kernel's array: larger than every cache
    quiet_wait: float = 90.0  # seconds a workload may spend in all waiting for other processes to leave the CPUs


SMOKE = Plan(
    shapes=("tiny",), dtypes=("bf16",), headline="tiny-bf16", prompt=16, new_tokens=6, slow_new_tokens=4,
    numpy_new_tokens=4, prefill_prompts=(16,), contexts=(32,), context_new_tokens=4, hf_context_new_tokens=4,
    profile_steps=3, hf_dtypes=("float32",), repeats=2, ceiling_repeats=3, stream_bytes=2**26, quiet_wait=0.0,
)


@dataclass
class Workload:
    name: str  # "<impl>/<variant>/<model>/<work>/<threads>t": what --only matches
    spec: dict  # what the worker needs; "kind" picks the worker function
    params: dict = field(default_factory=dict)  # what the report needs besides the worker's output


def checkpoint_name(shape: str, dtype: str) -> str:
    return f"qwen1.5-{shape}-{DTYPES[dtype]}"


def build_workloads(plan: Plan, threads: int, ckpt_root: Path) -> list[Workload]:
    """Every workload of a run, ordered so that each model's qwen-ref and transformers runs are close in time."""
    def bandwidth(n: int, label: str) -> Workload:
        return Workload(f"ceiling/{label}/{n}t", {"kind": "bandwidth", "threads": n, "label": label,
                        "stream_bytes": plan.stream_bytes, "repeats": plan.ceiling_repeats,
                        "mmap_file": str(ckpt_root / checkpoint_name(plan.shapes[0], "bf16") / "model.safetensors")})

    work: list[Workload] = []
    for n in sorted({1, threads}):
        work.append(bandwidth(n, "bandwidth"))
        work.append(Workload(f"ceiling/gemm/{n}t", {"kind": "gemm", "threads": n, "repeats": plan.ceiling_repeats,
                    "shapes": {s: str(ckpt_root / checkpoint_name(s, "bf16")) for s in plan.shapes},
                    "prompts": list(plan.prefill_prompts)}))

    for shape in plan.shapes:
        for dtype in plan.dtypes:
            model = f"{shape}-{dtype}"
            ckpt = str(ckpt_root / checkpoint_name(shape, dtype))
            slow = shape == "1.8b" and dtype == "f32"
            work.append(_decode(f"qwen-ref/numba/{model}/decode/{threads}t", "qwen_decode", ckpt, threads, plan,
                                backend="numba", new_tokens=plan.slow_new_tokens if slow else plan.new_tokens))
            for p in plan.prefill_prompts:
                work.append(_prefill(f"qwen-ref/numba/{model}/prefill-{p}/{threads}t", "qwen_prefill", ckpt,
                                     threads, plan, p, backend="numba"))
            if model == plan.headline:
                work.extend(_headline_extras(model, ckpt, threads, plan))
        hf_ckpt = str(ckpt_root / checkpoint_name(shape, "bf16"))  # the published storage; torch converts it
        for torch_dtype in plan.hf_dtypes:
            prefix = f"transformers/{torch_dtype}/{shape}"
            slow = shape == "1.8b" and torch_dtype == "float32"
            work.append(_decode(f"{prefix}/decode/{threads}t", "hf_decode", hf_ckpt, threads, plan,
                                torch_dtype=torch_dtype, new_tokens=plan.slow_new_tokens if slow else plan.new_tokens))
            for p in plan.prefill_prompts:
                work.append(_prefill(f"{prefix}/prefill-{p}/{threads}t", "hf_prefill", hf_ckpt, threads, plan, p,
                                     torch_dtype=torch_dtype))
            if plan.headline.startswith(f"{shape}-") and torch_dtype == "float32":
                for ctx in plan.contexts:
                    work.append(_decode(f"{prefix}/decode-ctx-{ctx}/{threads}t", "hf_decode", hf_ckpt, threads, plan,
                                        torch_dtype=torch_dtype, new_tokens=plan.hf_context_new_tokens, context=ctx))
                if threads > 1:  # the baseline of the 1-thread scaling runs
                    work.append(_decode(f"{prefix}/decode/1t", "hf_decode", hf_ckpt, 1, plan, torch_dtype=torch_dtype,
                                        new_tokens=plan.new_tokens))
                    work.append(_prefill(f"{prefix}/prefill-{plan.prefill_prompts[-1]}/1t", "hf_prefill", hf_ckpt, 1,
                                         plan, plan.prefill_prompts[-1], torch_dtype=torch_dtype))
    # The host's memory bandwidth drifts (other virtual machines); measuring it again shows by how much.
    work.append(bandwidth(threads, "bandwidth-end"))
    for w in work:
        w.spec["quiet_wait"] = plan.quiet_wait
    return work


def _headline_extras(model: str, ckpt: str, threads: int, plan: Plan) -> list[Workload]:
    """The context sweep, the numpy backend, 1-thread scaling and the op-by-op profile of one checkpoint."""
    work = [_decode(f"qwen-ref/numba/{model}/decode-ctx-{ctx}/{threads}t", "qwen_decode", ckpt, threads, plan,
                    backend="numba", new_tokens=plan.context_new_tokens, context=ctx) for ctx in plan.contexts]
    work.append(_decode(f"qwen-ref/numpy/{model}/decode/{threads}t", "qwen_decode", ckpt, threads, plan,
                        backend="numpy", new_tokens=plan.numpy_new_tokens))
    if threads > 1:
        work.append(_decode(f"qwen-ref/numba/{model}/decode/1t", "qwen_decode", ckpt, 1, plan, backend="numba",
                            new_tokens=plan.new_tokens))
        work.append(_prefill(f"qwen-ref/numba/{model}/prefill-{plan.prefill_prompts[-1]}/1t", "qwen_prefill", ckpt,
                             1, plan, plan.prefill_prompts[-1], backend="numba"))
    work.append(Workload(f"profile/numba/{model}/{threads}t", {"kind": "profile", "threads": threads,
                "model": model, "model_dir": ckpt, "contexts": list(plan.contexts), "steps": plan.profile_steps,
                "prompt": plan.prefill_prompts[-1], "repeats": plan.repeats}))
    return work


def _decode(name, kind, ckpt, threads, plan, new_tokens, context=None, **impl) -> Workload:
    spec = {"kind": kind, "threads": threads, "model_dir": ckpt, "prompt": plan.prompt, "new_tokens": new_tokens,
            "context": context, "repeats": plan.repeats, **impl}
    return Workload(name, spec, {"work": "decode", "context": context})


def _prefill(name, kind, ckpt, threads, plan, prompt, **impl) -> Workload:
    spec = {"kind": kind, "threads": threads, "model_dir": ckpt, "prompt": prompt, "repeats": plan.repeats, **impl}
    return Workload(name, spec, {"work": "prefill"})


# =================================================================================================
# Inside a worker subprocess: one workload, results as one JSON object on the original stdout

NOISY_CORES = 0.25  # a repeat during which other processes used more CPU than this is measured again
QUIET_CORES = 0.15  # what a quiet machine looks like before a (re)measurement starts


@dataclass
class CpuLoad:
    """CPU time that other processes used (and that the hypervisor stole) while this one measured."""

    wall: float = 0.0
    others: float = 0.0
    steal: float = 0.0

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        own = os.times()  # every thread of this process, spinning OpenMP workers included
        return time.perf_counter(), (user + nice + system + irq + softirq) / tick, steal / tick, own.user + own.system

    @contextmanager
    def measuring(self):
        wall0, busy0, steal0, own0 = self._snapshot()
        yield
        wall1, busy1, steal1, own1 = self._snapshot()
        self.wall += wall1 - wall0
        self.others += (busy1 - busy0) - (own1 - own0)
        self.steal += steal1 - steal0

    def cores(self) -> float:
        # /proc/stat counts ticks of 10 ms: allow one stray tick on short repeats
        return max(self.others - 0.01, 0.0) / max(self.wall, 1e-9)

    def summary(self) -> dict:
        wall = max(self.wall, 1e-9)
        return {"other_cores": round(max(self.others, 0.0) / wall, 3), "steal_cores": round(self.steal / wall, 3)}


def wait_for_quiet(max_seconds: float) -> float:
    """Sleep until other processes leave the CPUs (nearly) idle for a second, or max_seconds pass."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_seconds:
        window = CpuLoad()
        with window.measuring():
            time.sleep(1.0)
        if window.cores() < QUIET_CORES:
            break
    return time.perf_counter() - start


def measure(run: Callable[[], float], spec: dict, what: str, unit: str) -> dict:
    """`spec["repeats"]` values of run(), each taken while the machine was quiet if it became quiet.

    A repeat during which other processes used > NOISY_CORES cores is discarded and run again after
    waiting for quiet, up to as many extra times as there are repeats; what was discarded is reported.
    All the waits of one workload take at most spec["quiet_wait"] seconds (what is left is kept there).
    """
    repeats = spec["repeats"]

    def wait() -> float:
        waited = wait_for_quiet(spec["quiet_wait"])
        spec["quiet_wait"] = max(0.0, spec["quiet_wait"] - waited)
        return waited

    values, discarded, total, waited = [], [], CpuLoad(), wait()
    while len(values) < repeats:
        load = CpuLoad()
        with load.measuring():
            value = run()
        if load.cores() > NOISY_CORES and len(discarded) < repeats:
            discarded.append({"value": value, "other_cores": round(load.cores(), 2)})
            _progress(f"{what}: {_f(value)} {unit} with {load.cores():.1f} other cores busy: discarded, waiting for quiet")
            waited += wait()
            continue
        values.append(value)
        for name in ("wall", "others", "steal"):
            setattr(total, name, getattr(total, name) + getattr(load, name))
        if repeats <= 5:
            _progress(f"{what}: repeat {len(values)}: {_f(value)} {unit}")
    _progress(f"{what}: {_f(float(np.median(values)))} {unit} (median of {repeats})")
    return {"unit": unit, "values": values, "median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values)), "repeats": len(values), **total.summary(), "discarded": discarded,
            "quiet_wait_seconds": round(waited, 1)}


def _progress(text: str) -> None:
    print(f"    {text}", file=sys.stderr, flush=True)


def _qwen_threads(n: int) -> None:
    from qwen_ref.threads import set_threads

    set_threads(n)


@functools.cache
def stream_kernel():
    """Compiled in the workers only: the parent never imports numba."""
    from numba import njit, prange

    @njit(parallel=True, fastmath={"reassoc"}, cache=True)
    def stream(words, partial):
        """Read each row once, as a GEMV reads a weight row, with as little arithmetic as possible."""
        for r in prange(words.shape[0]):
            acc = np.float32(0.0)
            for j in range(words.shape[1]):
                acc += words[r, j]
            partial[r] = acc

    return stream


def work_bandwidth(spec: dict) -> list[dict]:
    """Streaming read bandwidth: every row of a >= 1 GB float32 array summed once, rows split over threads.

    Also over the checkpoint file mapped as qwen-ref maps it (page-cache pages, 2 MB where the kernel
    keeps the file in large folios; NumPy asks for huge pages for its own large arrays).
    """
    _qwen_threads(spec["threads"])
    arrays = {"anon": lambda: np.ones((spec["stream_bytes"] // 4096, 1024), dtype=np.float32)}
    if Path(spec["mmap_file"]).is_file():
        def mapped():
            from qwen_ref.weights import map_file

            data = np.frombuffer(map_file(Path(spec["mmap_file"])), dtype=np.uint8)  # as qwen-ref maps it
            return data[: len(data) // 4096 * 4096].view(np.float32).reshape(-1, 1024)
        arrays["mmap-file"] = mapped
    out = []
    for label, make in arrays.items():
        words = make()  # [rows, 1024] float32
        once = functools.partial(_stream_gbps, words, np.empty(words.shape[0], dtype=np.float32))
        once(), once()  # JIT, page faults, page cache
        m = measure(once, spec, label, "GB/s")
        out.append({"name": f"ceiling/{spec['label']}/{label}/{spec['threads']}t", "bytes": int(words.nbytes), **m})
        del words, once  # before the next array is made
    return out


def _stream_gbps(words: np.ndarray, partial: np.ndarray) -> float:
    start = time.perf_counter()
    stream_kernel()(words, partial)
    return words.nbytes / (time.perf_counter() - start) / 1e9


def _layer_matrices(model_dir: str) -> list[tuple[int, int]]:
    """[n_out, n_in] of the seven matrices of one decoder layer, in the order the forward pass uses them."""
    from qwen_ref.config import load_config

    c = load_config(Path(model_dir))
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    D, F = c.hidden_size, c.intermediate_size
    return [(q, D), (kv, D), (kv, D), (D, q), (F, D), (F, D), (D, F)]


def work_gemm(spec: dict) -> list[dict]:
    """NumPy's BLAS on float32: the seven products of one decoder layer, x [T, n_in] @ W.T, in GFLOP/s."""
    from threadpoolctl import threadpool_info

    _qwen_threads(spec["threads"])
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture")} for i in threadpool_info()]
    rng = np.random.default_rng(0)
    out = []
    for shape, model_dir in spec["shapes"].items():
        mats = _layer_matrices(model_dir)
        weights = [rng.standard_normal(m, dtype=np.float32) * 0.02 for m in mats]  # [n_out, n_in] each
        for T in spec["prompts"]:
            x = {n_in: rng.standard_normal((T, n_in), dtype=np.float32) for _, n_in in mats}  # [T, n_in]
            layer = functools.partial(_layer_gflops, x, weights)
            layer(), layer()  # warm-up
            m = measure(layer, spec, f"{shape} T={T}", "GFLOP/s")
            out.append({"name": f"ceiling/gemm/{shape}/T{T}/{spec['threads']}t", "matrices": mats, "tokens": T,
                        "blas": blas, **m})
    return out


def _layer_gflops(x: dict[int, np.ndarray], weights: list[np.ndarray]) -> float:
    """One pass of x[T, n_in] @ W.T over the weights, in GFLOP/s."""
    start = time.perf_counter()
    for w in weights:
        x[w.shape[1]] @ w.T  # [T, n_out]
    seconds = time.perf_counter() - start
    return sum(2 * x[w.shape[1]].shape[0] * w.size for w in weights) / seconds / 1e9


def _random_tokens(n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, n)


def _fill_cache(cache, context: int) -> None:
    """Random keys and values in the first `context` slots: a decode step's cost does not depend on them."""
    rng = np.random.default_rng(1)
    L, Hkv, _, hd = cache.keys.shape
    block = min(context, 1024)
    for store in (cache.keys, cache.values):
        tile = rng.standard_normal((L, Hkv, block, hd), dtype=np.float32)  # [L, Hkv, block, hd]
        for start in range(0, context, block):
            n = min(block, context - start)
            store[:, :, start : start + n] = tile[:, :, :n]
    cache.length = context


def _qwen_model(spec: dict, backend: str | None = None):
    from qwen_ref import load_model
    from qwen_ref.backends import get_backend

    _qwen_threads(spec["threads"])
    return load_model(spec["model_dir"], get_backend(backend or spec["backend"]))


def _numba_info(spec: dict) -> dict:
    if spec.get("backend") != "numba":
        return {}
    import numba

    return {"numba_threading_layer": numba.threading_layer()}


def work_qwen_decode(spec: dict) -> list[dict]:
    """Greedy generation; tokens/s of the steps after the first token (prefill excluded)."""
    from qwen_ref.generation import GenerationStats, generate
    from qwen_ref.sampling import GREEDY, Sampler

    model = _qwen_model(spec)
    ctx, n_new = spec["context"], spec["new_tokens"]
    if ctx is None:
        tokens, cache = _random_tokens(spec["prompt"], model.config.vocab_size), None
    else:
        # generate() keeps what the cache holds and computes only the last token of `tokens`
        tokens = _random_tokens(ctx + 1, model.config.vocab_size)
        cache = model.new_cache(ctx + n_new)
        _fill_cache(cache, ctx)

    def run(n: int) -> float:
        stats = GenerationStats()
        for _ in generate(model, list(tokens), n, (), Sampler(GREEDY), cache=cache, stats=stats):
            pass  # no eos ids: always n tokens, as min_new_tokens=max_new_tokens
        return stats.decode_tokens / stats.decode_seconds

    run(min(4, n_new))  # JIT (from the disk cache), page cache, thread pools
    m = measure(lambda: run(n_new), spec, "decode", "tokens/s")
    return [{"decode_steps": n_new - 1, **m, **_numba_info(spec)}]


def work_qwen_prefill(spec: dict) -> list[dict]:
    """One prompt through an empty cache, logits of the last position only (what generation needs)."""
    from qwen_ref.generation import prefill

    model = _qwen_model(spec)
    tokens = _random_tokens(spec["prompt"], model.config.vocab_size)

    def run(n: int) -> float:
        cache = model.new_cache(n)
        start = time.perf_counter()
        prefill(model, tokens[:n], cache, last_only=True)
        return n / (time.perf_counter() - start)

    run(min(64, len(tokens)))  # warm-up
    return [{**measure(lambda: run(len(tokens)), spec, "prefill", "tokens/s"), **_numba_info(spec)}]


class OpTimer:
    """Wraps a backend's operations; accumulates seconds, bytes read and FLOPs under a label per call."""

    def __init__(self, weight_labels: dict[int, str]):
        self.weight_labels = weight_labels  # id(weight array) -> "q_proj", "lm_head", ...
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.bytes, self.flops = defaultdict(float), defaultdict(float)

    def backend(self, inner):
        def cost_linear(x, w, b=None):
            return self.weight_labels.get(id(w), "linear (other)"), w.nbytes, 2.0 * x.shape[0] * w.size

        def cost_linears(x, ws, bs):
            label = "+".join(self.weight_labels.get(id(w), "linear (other)") for w in ws)
            return label, sum(w.nbytes for w in ws), sum(2.0 * x.shape[0] * w.size for w in ws)

        def cost_swiglu(x, w_gate, w_up):
            label = "swiglu: " + "+".join(self.weight_labels.get(id(w), "linear (other)") for w in (w_gate, w_up))
            return label, w_gate.nbytes + w_up.nbytes, 4.0 * x.shape[0] * w_gate.size

        def cost_attention(q, keys, values, S):
            T, H, hd = q.shape
            keys_seen = T * S - T * (T - 1) / 2  # causal: query t sees S - T + t + 1 keys
            kv_bytes = 2 * keys.shape[0] * S * hd * keys.itemsize
            return "attention", kv_bytes, 4.0 * H * hd * keys_seen

        def cost_elementwise(label):
            return lambda x, *rest: (label, x.nbytes, 0.0)

        return dataclasses.replace(
            inner,
            linear=self._wrap(inner.linear, cost_linear),
            linears=self._wrap(inner.linears, cost_linears),
            swiglu=self._wrap(inner.swiglu, cost_swiglu),
            attention=self._wrap(inner.attention, cost_attention),
            rms_norm=self._wrap(inner.rms_norm, cost_elementwise("rms_norm")),
            apply_rope=self._wrap(inner.apply_rope, cost_elementwise("apply_rope")),
        )

    def _wrap(self, fn, cost):
        def timed(*args):
            start = time.perf_counter()
            out = fn(*args)
            seconds = time.perf_counter() - start
            label, nbytes, flops = cost(*args)
            self.seconds[label] += seconds
            self.calls[label] += 1
            self.bytes[label] += nbytes
            self.flops[label] += flops
            return out

        return timed

    def table(self, total_seconds: float, per: int) -> dict:
        """Per op: ms per `per` calls of the model (tokens, or one prefill), share of the total, GB/s, GFLOP/s."""
        ops = {}
        for label, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            ops[label] = {"ms": 1e3 * s / per, "share": s / total_seconds, "calls": self.calls[label] // per,
                          "GB/s": self.bytes[label] / s / 1e9, "GFLOP/s": self.flops[label] / s / 1e9}
        outside = total_seconds - sum(self.seconds.values())
        ops[OUTSIDE] = {"ms": 1e3 * outside / per, "share": outside / total_seconds}
        return ops


OUTSIDE = "outside the ops (Python, embedding, cache writes, residual adds)"


def work_profile(spec: dict) -> list[dict]:
    """Decode steps at each context, and one prefill, broken down by backend operation."""
    from qwen_ref.generation import prefill

    model = _qwen_model(spec, "numba")
    labels = {id(w): name.split(".")[-2] for name, w in model.weights.items() if name.endswith("proj.weight")}
    labels[id(model.lm_head)] = "lm_head (tied embedding)" if model.config.tie_word_embeddings else "lm_head"
    timer = OpTimer(labels)
    model.backend = timer.backend(model.backend)
    steps, out, where = spec["steps"], [], f"profile/numba/{spec['model']}"
    for ctx in spec["contexts"]:
        cache = model.new_cache(ctx + 2 + steps * (2 * spec["repeats"] + 1))
        _fill_cache(cache, ctx)
        _profile_steps(model, cache, timer, 2, [])  # warm-up
        tables: list[dict] = []
        run = functools.partial(_profile_steps, model, cache, timer, steps, tables)
        m = measure(run, spec, f"decode at context {ctx}", "ms/token")
        # the op table of the repeat whose time is the median (the tables of discarded repeats are there too)
        ops = min(tables, key=lambda table: abs(sum(op["ms"] for op in table.values()) - m["median"]))
        out.append({"name": f"{where}/decode-ctx-{ctx}/{spec['threads']}t", "context": ctx, **m, "ops": ops})
        del cache, run
    P = spec["prompt"]
    tokens = _random_tokens(P, model.config.vocab_size)
    prefill(model, tokens[:64], model.new_cache(64))  # warm-up
    tables = []

    def run_prefill() -> float:
        cache = model.new_cache(P)
        timer.reset()
        start = time.perf_counter()
        prefill(model, tokens, cache, last_only=True)
        seconds = time.perf_counter() - start
        tables.append(timer.table(seconds, 1))
        return 1e3 * seconds

    m = measure(run_prefill, {**spec, "repeats": 1}, f"prefill of {P}", "ms")
    out.append({"name": f"{where}/prefill-{P}/{spec['threads']}t", "prompt": P, **m, "ops": tables[-1]})
    return out


def _profile_steps(model, cache, timer: OpTimer, steps: int, tables: list[dict]) -> float:
    """`steps` decode steps (token 1 each time: the cost does not depend on it); ms per step. The op
    table of the steps is appended to `tables`."""
    timer.reset()
    start = time.perf_counter()
    for _ in range(steps):
        model.forward(np.array([1]), cache, last_only=True)  # [1, V]
    seconds = time.perf_counter() - start
    tables.append(timer.table(seconds, steps))
    return 1e3 * seconds / steps


def _hf_model(spec: dict):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(spec["threads"])
    # The attention implementation a user gets by default (sdpa); recorded with the results.
    model = Qwen2ForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["torch_dtype"]))
    return torch, model.eval()


def _hf_info(torch, model) -> dict:
    return {"attn_implementation": model.config._attn_implementation, "torch_threads": torch.get_num_threads()}


def work_hf_decode(spec: dict) -> list[dict]:
    """transformers' greedy decoding, step by step with a DynamicCache (what generate() runs, minus its
    bookkeeping); tokens/s of the steps after the first token."""
    from transformers import DynamicCache

    torch, model = _hf_model(spec)
    ctx, n_new = spec["context"], spec["new_tokens"]
    cfg = model.config
    if ctx is None:
        prompt = torch.from_numpy(_random_tokens(spec["prompt"], cfg.vocab_size))[None]  # [1, P]
    else:
        prompt = torch.from_numpy(_random_tokens(1, cfg.vocab_size))[None]  # [1, 1] after ctx cached tokens
        gen = torch.Generator().manual_seed(1)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (1, cfg.num_key_value_heads, ctx, hd)
        past = [(torch.randn(shape, generator=gen).to(model.dtype), torch.randn(shape, generator=gen).to(model.dtype))
                for _ in range(cfg.num_hidden_layers)]

    def run(n: int) -> float:
        cache = DynamicCache(config=cfg)
        if ctx is not None:
            for i, (k, v) in enumerate(past):
                cache.update(k, v, i)
        with torch.inference_mode():
            out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            start = time.perf_counter()
            for _ in range(n - 1):
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            return (n - 1) / (time.perf_counter() - start)

    run(min(4, n_new))  # warm-up
    return [{"decode_steps": n_new - 1, **measure(lambda: run(n_new), spec, "decode", "tokens/s"), **_hf_info(torch, model)}]


def work_hf_prefill(spec: dict) -> list[dict]:
    from transformers import DynamicCache

    torch, model = _hf_model(spec)
    prompt = torch.from_numpy(_random_tokens(spec["prompt"], model.config.vocab_size))[None]  # [1, P]

    def run(n: int) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=prompt[:, :n], cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            return n / (time.perf_counter() - start)

    run(min(64, prompt.shape[1]))  # warm-up
    return [{**measure(lambda: run(prompt.shape[1]), spec, "prefill", "tokens/s"), **_hf_info(torch, model)}]


WORKERS = {"bandwidth": work_bandwidth, "gemm": work_gemm, "qwen_decode": work_qwen_decode,
           "qwen_prefill": work_qwen_prefill, "profile": work_profile, "hf_decode": work_hf_decode,
           "hf_prefill": work_hf_prefill}


def worker_main(spec: dict) -> None:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr; stdout carries only the result
    measurements = WORKERS[spec["kind"]](spec)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    with os.fdopen(result_fd, "w") as out:
        json.dump({"measurements": measurements, "vm_hwm_bytes": hwm}, out)


# =================================================================================================
# The parent: checkpoints, subprocesses, peak memory


def ensure_checkpoint(root: Path, shape: str, dtype: str) -> Path:
    """The checkpoint folder, written by tools/make_checkpoint.py unless a complete one is there."""
    out = root / checkpoint_name(shape, dtype)
    config = out / "config.json"
    if config.is_file() and any(out.glob("*.safetensors")):
        if json.loads(config.read_text()).get("dtype") == DTYPES[dtype]:
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


def drop_from_page_cache(model_dir: Path) -> None:
    """Evict the checkpoint's files from the page cache, so that its first workload reads them from
    disk as a user's run would. Pages that were just written stay 4 KB pages in the page cache;
    read back from disk they come in large folios that qwen-ref maps as 2 MB pages (see
    qwen_ref.weights.map_file). Every run thus starts from the same state, whatever ran before."""
    for path in model_dir.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def kernels_digest() -> str:
    """Which kernels/ source a workload ran (another engineer may be changing it during the run)."""
    h = hashlib.sha256()
    for path in sorted((REPO / "kernels").glob("*.py")):
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
            gemm = measurements.get(f"ceiling/gemm/{shape}/T{P}/{threads}")
            m["flops_per_token"] = prefill_flops_per_token(f, P)
            if gemm:
                m["ceiling"] = gemm["median"] * 1e9 / m["flops_per_token"]
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


def targets(measurements: dict[str, dict], plan: Plan, threads: int) -> list[dict]:
    """The four figures the project is judged on, each with its threshold and whether it is met."""
    base = f"qwen-ref/numba/{plan.headline}"
    decode = measurements.get(f"{base}/decode/{threads}t", {})
    prefill = measurements.get(f"{base}/prefill-{plan.prefill_prompts[-1]}/{threads}t", {})
    long = measurements.get(f"{base}/decode-ctx-{plan.contexts[-1]}/{threads}t", {})
    model, P, ctx = plan.headline, plan.prefill_prompts[-1], plan.contexts[-1]
    rows = [
        (f"decode {model}, {plan.prompt}-token prompt: fraction of the decode ceiling", decode.get("fraction_of_ceiling"), 0.90, ">="),
        (f"decode {model}, {plan.prompt}-token prompt: x transformers float32", decode.get("vs_transformers_float32"), 3.0, ">="),
        (f"prefill {model}, {P}-token prompt: fraction of the prefill ceiling", prefill.get("fraction_of_ceiling"), 0.60, ">="),
        (f"prefill {model}, {P}-token prompt: x transformers float32", prefill.get("vs_transformers_float32"), 1.0, ">"),
        (f"decode {model} at context {ctx}: fraction of its ceiling (weights + KV cache)", long.get("fraction_of_ceiling"), 0.80, ">="),
    ]
    out = [{"target": t, "value": v, "threshold": th, "op": op,
            "met": None if v is None else (v >= th if op == ">=" else v > th)} for t, v, th, op in rows]
    over = [n for n, m in measurements.items() if m.get("rss_budget_bytes") and m["kind"] == "qwen_decode"
            and m["spec"].get("backend") == "numba" and m["peak_rss_bytes"] > m["rss_budget_bytes"]]
    have = [m for m in measurements.values() if m.get("rss_budget_bytes") and m["spec"].get("backend") == "numba"]
    out.append({"target": "decode peak RSS <= checkpoint + KV cache + 300 MB (every numba decode run)",
                "value": f"{len(have) - len(over)} of {len(have)} within" + (f"; over: {', '.join(over)}" if over else ""),
                "threshold": None, "op": None, "met": (not over) if have else None})
    return out


# =================================================================================================
# BENCHMARKS.md


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


def markdown(results: dict, plan: Plan) -> str:
    M, threads = results["measurements"], results["threads"]
    t = f"{threads}t"
    runs = [*results.get("earlier_runs", []), results]  # --only reruns merge into an earlier run's results
    lines = ["# qwen-ref benchmarks", "",
             "Measured by " + ", then ".join(f"`{r['command']}` ({r['started']} to {r['finished']})" for r in runs)
             + ". Regenerate with `python tools/bench.py` (all options: `--help`); a rerun of some workloads "
             "(`--only`) replaces just their measurements.", ""]
    mach, ver = results["machine"], results["versions"]
    lines += [f"**Machine**: {mach['cpu_model']}, {mach['cores_available']} cores available, "
              f"{mach['memory_gb']:.0f} GB, Linux {mach['kernel']}; transparent huge pages `{mach['thp']}`. "
              f"SIMD flags: {', '.join(mach['simd_flags'])}.", "",
              "**Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".", "",
              f"**Threads**: {threads} unless a name ends in `1t` (qwen-ref: `qwen_ref.threads.set_threads`; "
              "transformers: `torch.set_num_threads`).", ""]
    uses_kernels = {n: m.get("kernels_sha") for n, m in M.items() if m["kind"] == "profile"
                    or (m["kind"].startswith("qwen_") and m["spec"].get("backend") == "numba")}
    versions_seen = defaultdict(list)
    for n, digest in uses_kernels.items():
        versions_seen[digest].append(n)
    if len(versions_seen) > 1:
        lines += ["**Note**: `kernels/` changed while this was measured: " + "; ".join(
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
        fmt = _x if "x transformers" in tg["target"] else _pct
        value = tg["value"] if isinstance(tg["value"], str) else fmt(tg["value"])
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[tg["met"]]
        rows.append([tg["target"], value, "" if tg["threshold"] is None else f"{tg['op']} {fmt(tg['threshold'])}", verdict])
    lines += _table(["target", "measured", "threshold", ""], rows) + [""]

    lines += ["## Ceilings of this machine (measured in this run)", "",
              "Streaming read: a Numba `prange` over the rows of a float32 array, summing each row once (the "
              "access pattern of a GEMV), median of repeats. `anon`: a 1 GiB NumPy array (NumPy asks for huge "
              "pages); `mmap-file`: the 0.5B bf16 checkpoint file mapped as qwen-ref maps its weights "
              "(`qwen_ref.weights.map_file`).", ""]
    rows = [[f"{kind}{when}", *[_range(M.get(f"ceiling/{label}/{kind}/{n}t")) + _busy(M.get(f"ceiling/{label}/{kind}/{n}t"))
                                for n in sorted({1, threads})]]
            for label, when in (("bandwidth", ""), ("bandwidth-end", ", again at the end"))
            for kind in ("anon", "mmap-file") if any(M.get(f"ceiling/{label}/{kind}/{n}t") for n in (1, threads))]
    lines += _table(["read bandwidth, GB/s", *[f"{n} thread(s)" for n in sorted({1, threads})]], rows) + [""]
    rows = []
    for shape in plan.shapes:
        for P in plan.prefill_prompts:
            rows.append([f"{shape} layer, T={P}", *[_range(M.get(f"ceiling/gemm/{shape}/T{P}/{n}t")) for n in sorted({1, threads})]])
    blas = next((m.get("blas") for m in M.values() if m.get("blas")), None)
    lines += ["Float32 GEMM: NumPy's BLAS (" + (", ".join(f"{b['internal_api']} {b['version']} {b['architecture']}"
              for b in blas) if blas else "?") + ") on the seven products of one decoder layer, `x[T, n_in] @ W.T`.", ""]
    lines += _table(["GEMM GFLOP/s", *[f"{n} thread(s)" for n in sorted({1, threads})]], rows) + [""]
    lines += ["Decode ceiling = bytes a step reads / `anon` bandwidth (the higher median of the start and the end "
              "of the run): every layer matrix, bias and norm, the final "
              "norm, the LM head (for a tied model the embedding matrix, read as the head), one embedding row, and "
              "the KV cache at the step's context (keys and values, float32 in qwen-ref: 2 x L x Hkv x hd x 4 bytes "
              "per position; transformers keeps its cache in the model dtype). Prefill ceiling = GEMM GFLOP/s at the "
              "prompt's T / FLOPs per token: 2 x layer-matrix params + 2 x V x D / T (the LM head, last position "
              "only) + 4 x L x H x hd x (T + 1) / 2 (causal attention).", ""]

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
              "- The RSS budget is the checkpoint's size + the KV cache allocated for the run (float32) + 300 MB.",
              "- ⚠ marks a measurement during which other processes used that many cores (from /proc/stat); "
              "`steal_cores` in results.json is what the hypervisor took.", ""]
    return "\n".join(lines)


def _attn(M: dict) -> str:
    found = {m.get("attn_implementation") for m in M.values() if m.get("attn_implementation")}
    return ", ".join(sorted(found)) or "?"


def _profile_section(M: dict, plan: Plan, t: str) -> list[str]:
    decode = [M.get(f"profile/numba/{plan.headline}/decode-ctx-{ctx}/{t}") for ctx in plan.contexts]
    decode = [m for m in decode if m and "ops" in m]
    if not decode:
        return []
    lines = [f"## Where a decode step's time goes ({plan.headline}, numba)", "",
             "Each backend operation wrapped in a timer; ms per token summed over the layers, and the bandwidth "
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


# =================================================================================================
# Command line


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()

    def field_of(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(key)), "?")

    flags = field_of("flags").split()
    simd = [f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "f16c", "amx")) or f in ("bmi2",)]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"cpu_model": field_of("model name"), "cpu_flags": flags, "simd_flags": simd,
            "cores_available": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "kernel": platform.release(), "thp": thp.read_text().strip() if thp.is_file() else "?"}


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
                        help="where results.json and BENCHMARKS.md go (default: benchmarks/)")
    parser.add_argument("--checkpoints", type=Path, default=REPO / "benchmarks" / "checkpoints",
                        help="cache folder of the random-weight checkpoints, made when missing "
                             "(default: benchmarks/checkpoints/)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only the workloads whose name matches one of these glob patterns (see --list); "
                             "their results replace the same names in an existing results.json (default: all)")
    parser.add_argument("--list", action="store_true", help="print the workload names and exit")
    parser.add_argument("--repeats", type=int,
                        help=f"timed repeats of each model workload (default: {Plan.repeats}, {SMOKE.repeats} with --smoke)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of every workload; 1-thread scaling runs are added when > 1 "
                             "(default: every available core, here %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and tiny sizes: checks the script, measures nothing")
    parser.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md from --out/results.json")
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

    results_path = args.out / "results.json"
    previous = json.loads(results_path.read_text()) if args.only and results_path.is_file() else {}
    results = {
        "schema": 1,
        "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "threads": args.threads, "smoke": args.smoke, "plan": dataclasses.asdict(plan),
        "machine": machine_info(), "versions": versions(), "git": git_state(),
        "models": {f"{s}-{d}": model_facts(args.checkpoints / checkpoint_name(s, d)) for s in plan.shapes
                   for d in plan.dtypes if (args.checkpoints / checkpoint_name(s, d)).is_dir()},
        "measurements": dict(previous.get("measurements", {})),
    }
    if previous:
        results["earlier_runs"] = previous.get("earlier_runs", []) + [
            {k: previous.get(k) for k in ("command", "started", "finished")}]
    args.out.mkdir(parents=True, exist_ok=True)
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
        write_results(results, args.out, plan)  # after every workload: an interrupted run keeps what it measured
    print(write_results(results, args.out, plan))
    print(f"wrote {results_path} and {args.out / 'BENCHMARKS.md'} in {results['runtime_minutes']:.1f} min"
          + (f"; {len(failed)} workloads failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def write_results(results: dict, out: Path, plan: Plan) -> str:
    """Derive ceilings, fractions, ratios and targets; write results.json and BENCHMARKS.md; return the latter."""
    derive(results["measurements"], results["models"])
    results["targets"] = targets(results["measurements"], plan, results["threads"])
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results, plan)
    (out / "BENCHMARKS.md").write_text(md + "\n")
    return md


def report_only(out: Path) -> int:
    """Rewrite BENCHMARKS.md (and the derived figures) from an existing results.json."""
    results = json.loads((out / "results.json").read_text())
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["plan"].items()})
    print(write_results(results, out, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
