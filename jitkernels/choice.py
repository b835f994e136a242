"""Which prefill GEMM runs on this host: forced by name, or measured once per CPU and cached.

The products with T >= 4 rows of x have two kernels (`matmul.GEMMS`): Numba's tiled `_gemm` and
widen-then-BLAS (`jitkernels.gemm_blas`). Which is faster depends on the CPU and NumPy's BLAS (see
benchmarks/hosts/*/), so `auto` times both on a small layer of the Qwen1.5-0.5B shape, alternating,
and keeps the blas GEMM only if it is clearly faster (`_MARGIN`). Other processes can sway that
either way, so a busy measurement waits for a quiet machine (`_QUIET_WAIT`) and is taken again; the
other cores' use is kept with the result, in a JSON file in the kernel cache folder (keyed by the
qwen-ref version, kernel sources and NumPy) under the CPU's model name, LLVM's name for it and the
thread count: each host measures once (about a second). Attention's prefill items are chosen apart:
sgemm tiles (`attention_items.item_gemm`) wherever OpenBLAS is callable, as the micro-kernel ran far
behind them (benchmarks/KERNELS.md, item_gemm; measured on one host kind so far). `QWEN_REF_KERNELS`
(or `--kernels`, which wins) forces one family for both, so tests and benchmarks run every path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding
import numba
import numpy as np

from jitkernels import blas
from jitkernels.cache import CACHE_DIR

KERNELS = {"numba-gemm": "numba", "blas-gemm": "blas"}  # --kernels names -> matmul.GEMMS
KERNEL_CHOICES = ("auto", *KERNELS)
ENV = "QWEN_REF_KERNELS"
# The blas GEMM must be this much faster (median time ratio) to be chosen: near a tie the Numba kernel
# stays, as it needs nothing of NumPy's BLAS and its results do not change with NumPy's version.
_MARGIN = 1.10
_ROUNDS = 7
_BUSY_CORES = 0.25  # other processes' CPU use during a measurement above which it is taken again
_QUIET_WAIT = 10.0  # seconds to wait at most for the other processes to leave the CPUs
_FILE = "gemm-choice.json"
_log = logging.getLogger(__package__)


@dataclass(frozen=True)
class GemmChoice:
    gemm: str  # matmul.GEMMS: "numba" or "blas", the projections' GEMM
    reason: str  # why, in a few words
    attention: str  # matmul.GEMMS: what attention's prefill items multiply with

    @property
    def name(self) -> str:
        return next(k for k, v in KERNELS.items() if v == self.gemm)

    def __str__(self) -> str:
        tiles = "sgemm tiles" if self.attention == "blas" else "the Numba micro-kernel"
        return f"{self.name} ({self.reason}); prefill attention on {tiles}"


def choose_gemm(requested: str = "auto") -> GemmChoice:
    """The prefill GEMM for `requested` (KERNEL_CHOICES): a name forces it; auto defers to $QWEN_REF_KERNELS,
    then to the cached or new measurement. Raises ValueError for an unknown name or an unavailable BLAS."""
    why = "--kernels"
    if requested == "auto" and os.environ.get(ENV, "auto") != "auto":
        requested, why = os.environ[ENV], ENV
    if requested not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {requested!r} from {why} (choose from {', '.join(KERNEL_CHOICES)})")
    if requested == "blas-gemm" and not blas.available():
        raise ValueError(f"blas-gemm is unavailable: {blas.UNAVAILABLE}")
    if requested != "auto":
        return GemmChoice(KERNELS[requested], f"forced by {why}", KERNELS[requested])
    if not blas.available():
        return GemmChoice("numba", blas.UNAVAILABLE, "numba")
    if numba.config.DISABLE_JIT:  # plain Python kernels: timing them would take minutes and say nothing
        return GemmChoice("numba", "NUMBA_DISABLE_JIT is set: not measured", "blas")
    if CACHE_DIR is None:  # no folder to keep a measurement in: each process would compile both GEMMs
        return GemmChoice("numba", "no kernel cache folder to keep a measurement in: not measured", "blas")
    return _measured(numba.get_num_threads())


def describe_auto(threads: int) -> str:
    """What `auto` runs on this host with this many threads, without measuring: for `qwen-ref info`."""
    forced = os.environ.get(ENV, "auto")
    if forced != "auto":
        return f"{forced} (forced by {ENV})"
    if not blas.available():
        return f"numba-gemm ({blas.UNAVAILABLE})"
    known = cached_choice(threads)
    if known is None:
        return "not measured on this CPU yet: timed once when a model first loads; prefill attention on sgemm tiles"
    return str(known)


def cpu_key(threads: int) -> str:
    """The CPU as the cached choice knows it: model name (as lscpu shows it), LLVM's CPU name, threads."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} / {llvmlite.binding.get_host_cpu_name()} / {threads} threads"


def cached_choice(threads: int) -> GemmChoice | None:
    """The choice measured earlier on this CPU with this many threads, if the cache has one."""
    entry = _read_cache().get(cpu_key(threads))
    return None if entry is None else GemmChoice(entry["gemm"], _reason(entry, "measured on this CPU before"), "blas")


@functools.cache
def _measured(threads: int) -> GemmChoice:
    """The cached choice, or a new measurement (announced on stderr through the jitkernels logger).

    Processes starting together measure one after another, under a lock on the cache folder, and the
    later ones take the first one's result: a noisy second measurement could pick the other GEMM, and
    processes of one machine would then round differently.
    """
    with _choice_lock():
        return _measured_locked(threads)


@contextlib.contextmanager
def _choice_lock() -> Iterator[None]:
    """An exclusive flock on `gemm-choice.lock` in the cache folder, where there is one that can be locked."""
    fd = -1
    if CACHE_DIR is not None:
        try:
            fd = os.open(CACHE_DIR / "gemm-choice.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a read-only or lock-less folder: measure without it, as without a cache
            if fd >= 0:
                os.close(fd)
            fd = -1
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the flock


def _measured_locked(threads: int) -> GemmChoice:
    known = cached_choice(threads)
    if known is not None:
        return known
    for attempt in range(2):
        busy_before = _busy_seconds()
        numba_s, blas_s = _time_both()
        others = _other_cores(busy_before, _busy_seconds())
        if others <= _BUSY_CORES or attempt == 1:
            break
        _wait_for_quiet(_QUIET_WAIT)
    entry = {"gemm": "blas" if numba_s / blas_s >= _MARGIN else "numba", "numba_ms": round(numba_s * 1e3, 2),
             "blas_ms": round(blas_s * 1e3, 2), "other_cores": round(others, 2),
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    where = _write_cache(cpu_key(threads), entry)
    choice = GemmChoice(entry["gemm"], _reason(entry, "measured now"), "blas")
    _log.warning(f"jitkernels: prefill GEMM {choice}; {where}")
    return choice


def _busy_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds all processes used, CPU seconds this process used), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _other_cores(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float:
    """Cores that other processes (and the hypervisor's steal) kept busy on average between two readings."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def _wait_for_quiet(seconds: float) -> None:
    """Sleep in 1-second windows until one finds the other processes below _BUSY_CORES, or `seconds` pass."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        before = _busy_seconds()
        time.sleep(1.0)
        if _other_cores(before, _busy_seconds()) <= _BUSY_CORES:
            return


def _reason(entry: dict, when: str) -> str:
    busy = entry.get("other_cores", 0.0)
    beside = f", {busy:.1f} other cores busy" if busy > _BUSY_CORES else ""
    return f"{when}: blas {entry['numba_ms'] / entry['blas_ms']:.2f}x numba on a 128-token layer{beside}"


def _time_both() -> tuple[float, float]:
    """Median seconds of each GEMM on a layer's products (q, k, v; o; gate and up; down) of the
    Qwen1.5-0.5B shape, bfloat16 weights, 128 rows of x, run alternately."""
    from jitkernels.matmul import linear, linears, swiglu

    rng = np.random.default_rng(0)
    D, F, T = 1024, 2816, 128

    def weight(n_out: int, n_in: int) -> np.ndarray:
        w = (rng.standard_normal((n_out, n_in), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        w.flags.writeable = False
        return w  # [n_out, n_in] bfloat16 words

    q, k, v, o = (weight(D, D) for _ in range(4))
    gate, up, down = weight(F, D), weight(F, D), weight(D, F)
    x, a = rng.standard_normal((T, D), dtype=np.float32), rng.standard_normal((T, F), dtype=np.float32)

    def layer(gemm: str) -> float:
        start = time.perf_counter()
        linears(x, (q, k, v), (None, None, None), gemm)
        linear(x, o, None, gemm)
        swiglu(x, gate, up, gemm)
        linear(a, down, None, gemm)
        return time.perf_counter() - start

    times = {"numba": [], "blas": []}
    for gemm in times:
        layer(gemm)  # compiles or loads the kernels, warms the caches
    for r in range(_ROUNDS):
        for gemm in ("numba", "blas") if r % 2 == 0 else ("blas", "numba"):
            times[gemm].append(layer(gemm))
    return float(np.median(times["numba"])), float(np.median(times["blas"]))


def _cache_file() -> Path | None:
    return None if CACHE_DIR is None else CACHE_DIR / _FILE


def _read_cache() -> dict:
    path = _cache_file()
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> str:
    """Adds the entry to the cache file (replaced whole, so readers never see half of it); says where."""
    path = _cache_file()
    if path is None:
        return "not cached (no cache folder): measured again in each process"
    data = {**_read_cache(), key: entry}
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        return f"not cached ({exc.strerror})"
    return f"cached in {path}"
