"""Inside a worker subprocess (tools/bench.py --worker SPEC): one workload, results as one JSON
object on the original stdout.

A `work_*` function per kind of workload: the machine's ceilings (streaming read, GEMM), qwen-ref
and transformers decode and prefill, and the op-by-op profile; `measure` times their repeats while
the machine is quiet. numba, torch and transformers are imported inside these functions: the parent
process, which imports this module too, never loads them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_plan import NOISY_CORES, QUIET_CORES
from bench_report import _f


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


def measure(run: Callable[[], float], spec: dict, what: str, unit: str,
            beside: Callable[[], dict] | None = None) -> dict:
    """`spec["repeats"]` values of run(), each taken while the machine was quiet if it became quiet.

    A repeat during which other processes used > NOISY_CORES cores is discarded and run again after
    waiting for quiet, up to as many extra times as there are repeats; what was discarded is reported.
    All the waits of one workload take at most spec["quiet_wait"] seconds (what is left is kept there).
    With `beside` (see `ceiling_reads`), its readings just before and just after each repeat are kept
    with it, in "beside", one {"before", "after"} per value.
    """
    repeats = spec["repeats"]

    def wait() -> float:
        waited = wait_for_quiet(spec["quiet_wait"])
        spec["quiet_wait"] = max(0.0, spec["quiet_wait"] - waited)
        return waited

    values, readings, discarded, total, waited = [], [], [], CpuLoad(), wait()
    while len(values) < repeats:
        load = CpuLoad()
        with load.measuring():
            before = beside() if beside else None
            value = run()
            reading = {"before": before, "after": beside()} if beside else None
        if load.cores() > NOISY_CORES and len(discarded) < repeats:
            discarded.append({"value": value, "other_cores": round(load.cores(), 2),
                              **({"beside": reading} if beside else {})})
            _progress(f"{what}: {_f(value)} {unit} with {load.cores():.1f} other cores busy: discarded, waiting for quiet")
            waited += wait()
            continue
        values.append(value)
        readings.append(reading)
        for name in ("wall", "others", "steal"):
            setattr(total, name, getattr(total, name) + getattr(load, name))
        if repeats <= 5:
            _progress(f"{what}: repeat {len(values)}: {_f(value)} {unit}")
    _progress(f"{what}: {_f(float(np.median(values)))} {unit} (median of {repeats})")
    return {"unit": unit, "values": values, "median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values)), "repeats": len(values), **total.summary(), "discarded": discarded,
            "quiet_wait_seconds": round(waited, 1), **({"beside": readings} if beside else {})}


def drop_from_page_cache(model_dir: Path) -> None:
    """Evict the checkpoint's files from the page cache, so that its first workload reads them from
    disk as a user's run would. Pages that were just written stay 4 KB pages in the page cache;
    read back from disk they come in large folios that qwen-ref maps as 2 MB pages (see
    qwen_ref.weights.map_file). Every run thus starts from the same state, whatever ran before."""
    for path in Path(model_dir).glob("*.safetensors"):
        drop_file_from_page_cache(path)


def drop_file_from_page_cache(path: Path) -> None:
    """Evict one file's pages, written back first (the kernel keeps dirty pages)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache(model_dir: str) -> float | None:
    """The fraction of the checkpoint's weight files in the page cache now (qwen_ref.paging)."""
    from qwen_ref.paging import page_cache_fraction

    return page_cache_fraction(sorted(Path(model_dir).glob("*.safetensors")))


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


@functools.cache
def bf16_read_kernel():
    """Compiled in the workers only, like stream_kernel."""
    from numba import njit, prange

    from jitkernels.widen import widen_bf16_pair

    @njit(parallel=True, fastmath={"reassoc"}, cache=True)
    def read_bf16(pairs, partial):
        """Read each row once as bfloat16 pairs, widening both words to float32 as qwen-ref's GEMV does and
        adding them: no more work per byte than that GEMV, whose fused multiply-adds cost what these adds cost."""
        for r in prange(pairs.shape[0]):
            acc = np.float32(0.0)
            for j in range(pairs.shape[1]):
                low, high = widen_bf16_pair(pairs[r, j])
                acc += low + high
            partial[r] = acc

    return read_bf16


def work_bandwidth(spec: dict) -> list[dict]:
    """Streaming read bandwidth: every row of a >= 1 GB float32 array summed once, rows split over threads.

    Also over the checkpoint file mapped as qwen-ref maps it (page-cache pages, 2 MB where the kernel
    keeps the file in large folios; NumPy asks for huge pages for its own large arrays), and the
    anonymous array read as bfloat16 (`anon-bf16`): how fast the cores widen what they read, a
    measured bound for GEMVs that widen bfloat16 words the same way.
    """
    _qwen_threads(spec["threads"])
    arrays = {"anon": lambda: np.ones((spec["stream_bytes"] // 4096, 1024), dtype=np.float32)}
    if Path(spec["mmap_file"]).is_file():  # "" (a paired round's read) is not a file
        def mapped():
            from qwen_ref.weights import map_file

            data = np.frombuffer(map_file(Path(spec["mmap_file"])), dtype=np.uint8)  # as qwen-ref maps it
            return data[: len(data) // 4096 * 4096].view(np.float32).reshape(-1, 1024)
        arrays["mmap-file"] = mapped
    out = []
    for label, make in arrays.items():
        words = make()  # [rows, 1024] float32
        partial = np.empty(words.shape[0], dtype=np.float32)
        reads = {label: functools.partial(_read_gbps, stream_kernel(), words, partial)}
        if label == "anon":
            reads["anon-bf16"] = functools.partial(_read_gbps, bf16_read_kernel(), words.view(np.uint32), partial)
        for name, once in reads.items():
            once(), once()  # JIT, page faults, page cache
            m = measure(once, spec, name, "GB/s")
            out.append({"name": f"{spec['prefix']}/{spec['label']}/{name}/{spec['threads']}t", "bytes": int(words.nbytes), **m})
        del words, reads  # before the next array is made
    return out


def ceiling_reads(stream_bytes: int) -> Callable[[], dict]:
    """The streaming reads of `work_bandwidth`'s anonymous array (`anon`, and as bfloat16, `anon-bf16`)
    inside a decode's own process: `measure` takes them just before and just after each repeat, seconds
    from the decode they bound, where the paired rounds' separate workloads are a minute away and the
    host's bandwidth moves by 20% within one. Each reading is the median of 3 reads, in GB/s."""
    words = np.ones((stream_bytes // 4096, 1024), dtype=np.float32)  # [rows, 1024]
    partial = np.empty(words.shape[0], dtype=np.float32)
    # anon-bf16 is the bound of a bfloat16 headline; for another it costs ~0.1 s per reading, unused
    reads = {"anon": (stream_kernel(), words), "anon-bf16": (bf16_read_kernel(), words.view(np.uint32))}

    def reading() -> dict:
        return {name: float(np.median([_read_gbps(kernel, a, partial) for _ in range(3)]))
                for name, (kernel, a) in reads.items()}

    reading()  # JIT, page faults
    return reading


def _read_gbps(kernel, words: np.ndarray, partial: np.ndarray) -> float:
    start = time.perf_counter()
    kernel(words, partial)
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
            out.append({"name": f"{spec['prefix']}/{spec['label']}/{shape}/T{T}/{spec['threads']}t", "matrices": mats, "tokens": T,
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
    """Random keys and values in the first `context` slots, rounded to the cache's dtype (the same values
    for every dtype): a decode step's cost does not depend on them."""
    from qwen_ref.kv_cache import round_to_kv_dtype

    rng = np.random.default_rng(1)
    L, Hkv, _, hd = cache.keys.shape
    block = min(context, 1024)
    for store in (cache.keys, cache.values):
        tile = round_to_kv_dtype(rng.standard_normal((L, Hkv, block, hd), dtype=np.float32), cache.kv_dtype)
        for start in range(0, context, block):
            n = min(block, context - start)
            store[:, :, start : start + n] = tile[:, :, :n]
    cache.length = context


def _qwen_model(spec: dict, backend: str | None = None):
    """The model, and what to record with its measurements: the checkpoint's page-cache state before it
    loaded (its warm-up reads the rest), and for numba the prefill GEMM (jitkernels.choice) and threading layer."""
    from qwen_ref import load_model
    from qwen_ref.backends import get_backend

    _qwen_threads(spec["threads"])
    facts = {"page_cache_at_load": page_cache(spec["model_dir"])}
    model = load_model(spec["model_dir"], get_backend(backend or spec["backend"]))
    if (backend or spec["backend"]) == "numba":
        import numba

        from jitkernels import choose_gemm

        choice = choose_gemm()  # what the backend took: forced by $QWEN_REF_KERNELS, or cached for this CPU
        facts |= {"prefill_gemm": choice.name, "prefill_gemm_reason": choice.reason,
                  "numba_threading_layer": numba.threading_layer()}
    return model, facts


def work_qwen_decode(spec: dict) -> list[dict]:
    """Greedy generation; tokens/s of the steps after the first token (prefill excluded). In a paired
    round (spec["ceiling_beside"]: the array's bytes) also the ceiling reads beside each repeat; with
    spec["kv_dtypes"], one measurement per KV cache dtype (`_decode_kv_dtypes`)."""
    from qwen_ref.generation import GenerationStats, generate
    from qwen_ref.sampling import GREEDY, Sampler

    model, facts = _qwen_model(spec)
    if spec.get("kv_dtypes"):
        return [{**m, **facts} for m in _decode_kv_dtypes(model, spec)]
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
    beside = ceiling_reads(spec["ceiling_beside"]) if spec.get("ceiling_beside") else None
    m = measure(lambda: run(n_new), spec, "decode", "tokens/s", beside)
    return [{"decode_steps": n_new - 1, **m, **facts}]


def _decode_kv_dtypes(model, spec: dict) -> list[dict]:
    """Decode at spec["context"] with a cache of each of spec["kv_dtypes"], filled with the same values: in one
    process, so that the weights, the page cache and the host's state are shared, and a round of one repeat
    per dtype (in an order that rotates from round to round) takes seconds. Per dtype: tokens/s over the
    rounds and each round's ratio to the first dtype's tokens/s, whose median is `vs_<first>`."""
    from qwen_ref.generation import GenerationStats, generate
    from qwen_ref.sampling import GREEDY, Sampler

    ctx, n_new, kv_dtypes = spec["context"], spec["new_tokens"], spec["kv_dtypes"]
    tokens = _random_tokens(ctx + 1, model.config.vocab_size)  # generate() computes only the last one
    caches = {}
    for kv_dtype in kv_dtypes:
        model.kv_dtype = kv_dtype
        caches[kv_dtype] = model.new_cache(ctx + n_new)
        _fill_cache(caches[kv_dtype], ctx)

    def run(kv_dtype: str, n: int) -> float:
        stats = GenerationStats()
        for _ in generate(model, list(tokens), n, (), Sampler(GREEDY), cache=caches[kv_dtype], stats=stats):
            pass  # each repeat rewrites the same n positions after the filled ones
        return stats.decode_tokens / stats.decode_seconds

    for kv_dtype in kv_dtypes:
        run(kv_dtype, min(4, n_new))  # JIT for each cache dtype, page faults
    one = {**spec, "repeats": 1}  # shared, so that all the waits for quiet draw on one budget
    rounds: dict[str, list[dict]] = {kv_dtype: [] for kv_dtype in kv_dtypes}
    for r in range(spec["repeats"]):
        for kv_dtype in kv_dtypes[r % len(kv_dtypes):] + kv_dtypes[: r % len(kv_dtypes)]:
            rounds[kv_dtype].append(measure(functools.partial(run, kv_dtype, n_new), one,
                                            f"decode, {kv_dtype} cache, round {r + 1}", "tokens/s"))
    first = [m["median"] for m in rounds[kv_dtypes[0]]]
    out = []
    for kv_dtype, ms in rounds.items():
        values = [m["median"] for m in ms]
        ratios = [v / f for v, f in zip(values, first)]
        out.append({"name": f"qwen-ref/numba/{spec['model']}/decode-ctx-{ctx}-kv-{kv_dtype}/{spec['threads']}t",
                    "kv_dtype": kv_dtype, "decode_steps": n_new - 1, "unit": "tokens/s", "values": values,
                    "median": float(np.median(values)), "min": min(values), "max": max(values),
                    "repeats": len(values), f"vs_{kv_dtypes[0]}_rounds": ratios,
                    f"vs_{kv_dtypes[0]}": float(np.median(ratios)),
                    "other_cores": float(np.mean([m["other_cores"] for m in ms])),
                    "steal_cores": float(np.mean([m["steal_cores"] for m in ms])),
                    "discarded": [d for m in ms for d in m["discarded"]],
                    "quiet_wait_seconds": round(sum(m["quiet_wait_seconds"] for m in ms), 1)})
    return out


def work_qwen_prefill(spec: dict) -> list[dict]:
    """One prompt through an empty cache, logits of the last position only (what generation needs)."""
    from qwen_ref.generation import prefill

    model, facts = _qwen_model(spec)
    tokens = _random_tokens(spec["prompt"], model.config.vocab_size)

    def run(n: int) -> float:
        cache = model.new_cache(n)
        start = time.perf_counter()
        prefill(model, tokens[:n], cache)  # logits of the last position only
        return n / (time.perf_counter() - start)

    run(min(64, len(tokens)))  # warm-up
    return [{**measure(lambda: run(len(tokens)), spec, "prefill", "tokens/s"), **facts}]


def work_ttft(spec: dict) -> list[dict]:
    """Time to the first token as a user meets it, checkpoint cold and warm, round after round.

    Each figure is one `qwen-ref generate --max-new-tokens 1` of a spec["prompt"]-token prompt in a fresh
    process, from its launch to the token on its stdout: interpreter start-up, imports, kernels from the
    JIT cache, load, and a prefill that reads whatever of the checkpoint the page cache lacks. Cold: the
    checkpoint evicted first (as these hosts trim an idle page cache); warm: right after, the same again.
    Only the checkpoint is evicted: Python, the libraries and the JIT cache stay in the page cache. The
    command's own timings line (load, prompt tokens/s, first token) is parsed and kept beside each figure.
    """
    import re
    import subprocess
    import tempfile

    vocab = json.loads((Path(spec["model_dir"]) / "config.json").read_text())["vocab_size"]
    tokens = ",".join(str(t) for t in _random_tokens(spec["prompt"], vocab))
    cmd = [sys.executable, "-m", "qwen_ref", "generate", "--model", spec["model_dir"], "--tokens", tokens,
           "--max-new-tokens", "1", "--threads", str(spec["threads"])]
    fields = {"cli_load_seconds": r"load: ([\d.]+) s", "cli_first_token_seconds": r"first token: ([\d.]+) s",
              "cli_prompt_tokens_per_s": r"prompt: \d+ tokens, ([\d.]+) tok/s"}

    def first_token() -> tuple[float, dict]:
        """Seconds from launch to the first byte on stdout (the token's id, flushed as it comes), and the
        command's timings."""
        with tempfile.TemporaryFile("w+") as stderr:  # a file: a pipe read only at the end could fill and block
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
            proc.stdout.read(1)
            seconds = time.perf_counter() - start
            proc.communicate()
            stderr.seek(0)
            err = stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"qwen-ref generate exited with {proc.returncode}: {err[-2000:]}")
        found = {k: re.search(pattern, err) for k, pattern in fields.items()}
        return seconds, {k: float(m.group(1)) if m else None for k, m in found.items()}

    if spec.get("warm_up", True):
        first_token()  # JIT cache, the GEMM choice: measured once per CPU, then cached
    runs = {state: {"values": [], "page_cache_before": [], "other_cores_rounds": [], **{k: [] for k in fields}}
            for state in ("cold", "warm")}
    waited = 0.0
    for r in range(spec["repeats"]):
        waited += wait_for_quiet(max(0.0, spec["quiet_wait"] - waited))
        for state, run in runs.items():
            if state == "cold":
                drop_from_page_cache(Path(spec["model_dir"]))
            run["page_cache_before"].append(page_cache(spec["model_dir"]))
            load, children = CpuLoad(), os.times()
            with load.measuring():
                seconds, timings = first_token()
            load.others -= (os.times().children_user - children.children_user) + (
                os.times().children_system - children.children_system)  # the child's CPU is the workload's
            run["values"].append(seconds)
            run["other_cores_rounds"].append(round(load.cores(), 3))
            for k, v in timings.items():
                run[k].append(v)
            _progress(f"first token, {state}: {seconds:.2f} s (round {r + 1}, checkpoint "
                      f"{100 * (run['page_cache_before'][-1] or 0):.0f}% in page cache)")
    out = []
    for state, run in runs.items():
        v = run["values"]
        out.append({"name": f"qwen-ref/numba/{spec['model']}/ttft-{spec['prompt']}-{state}/{spec['threads']}t",
                    "page_cache": state, "unit": "s", "median": float(np.median(v)), "min": min(v), "max": max(v),
                    "repeats": len(v), "other_cores": float(np.mean(run["other_cores_rounds"])),
                    "discarded": [], "quiet_wait_seconds": round(waited, 1), **run})
    return out


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
            decoder_stack=None,  # each operation runs (and is timed) on its own
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

    model, facts = _qwen_model(spec, "numba")
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
        out.append({"name": f"{where}/decode-ctx-{ctx}/{spec['threads']}t", "context": ctx, **m, "ops": ops, **facts})
        del cache, run
    P = spec["prompt"]
    tokens = _random_tokens(P, model.config.vocab_size)
    prefill(model, tokens[:64], model.new_cache(64))  # warm-up
    tables = []

    def run_prefill() -> float:
        cache = model.new_cache(P)
        timer.reset()
        start = time.perf_counter()
        prefill(model, tokens, cache)  # logits of the last position only
        seconds = time.perf_counter() - start
        tables.append(timer.table(seconds, 1))
        return 1e3 * seconds

    m = measure(run_prefill, {**spec, "repeats": 1}, f"prefill of {P}", "ms")
    out.append({"name": f"{where}/prefill-{P}/{spec['threads']}t", "prompt": P, **m, "ops": tables[-1], **facts})
    return out


def _profile_steps(model, cache, timer: OpTimer, steps: int, tables: list[dict]) -> float:
    """`steps` decode steps (token 1 each time: the cost does not depend on it); ms per step. The op
    table of the steps is appended to `tables`."""
    from qwen_ref.model import LAST_ROW

    timer.reset()
    start = time.perf_counter()
    for _ in range(steps):
        model.forward(np.array([1]), cache, LAST_ROW)  # [1, V]
    seconds = time.perf_counter() - start
    tables.append(timer.table(seconds, steps))
    return 1e3 * seconds / steps


def _hf_model(spec: dict):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(spec["threads"])
    spec["page_cache_at_load"] = page_cache(spec["model_dir"])  # recorded by _hf_info
    # The attention implementation a user gets by default (sdpa); recorded with the results.
    model = Qwen2ForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["torch_dtype"]))
    return torch, model.eval()


def _hf_info(torch, model, spec: dict) -> dict:
    return {"attn_implementation": model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
            "page_cache_at_load": spec["page_cache_at_load"]}


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
    return [{"decode_steps": n_new - 1, **measure(lambda: run(n_new), spec, "decode", "tokens/s"), **_hf_info(torch, model, spec)}]


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
    return [{**measure(lambda: run(prompt.shape[1]), spec, "prefill", "tokens/s"), **_hf_info(torch, model, spec)}]


WORKERS = {"bandwidth": work_bandwidth, "gemm": work_gemm, "qwen_decode": work_qwen_decode,
           "qwen_prefill": work_qwen_prefill, "profile": work_profile, "hf_decode": work_hf_decode,
           "hf_prefill": work_hf_prefill, "ttft": work_ttft}


def worker_main(spec: dict) -> None:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr; stdout carries only the result
    measurements = WORKERS[spec["kind"]](spec)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    with os.fdopen(result_fd, "w") as out:
        json.dump({"measurements": measurements, "vm_hwm_bytes": hwm}, out)
