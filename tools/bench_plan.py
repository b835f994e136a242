"""What one run of tools/bench.py measures: its sizes (`Plan`, shrunk to `SMOKE` for CI), its
workloads, each named `<impl>/<variant>/<model>/<work>/<threads>t` with the spec its worker
subprocess gets, and when other processes disturb a measurement enough to measure it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}  # short name (in workload names) -> torch's

NOISY_CORES = 0.25  # a repeat during which other processes used more CPU than this is measured again
QUIET_CORES = 0.15  # what a quiet machine looks like before a (re)measurement starts


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
    # the headline's decode at the longest context with a cache of each dtype, alternating in one process;
    # the first is the one the others are compared with
    kv_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    context_new_tokens: int = 32
    hf_context_new_tokens: int = 8  # transformers copies its whole cache every step: 0.5 tokens/s at 16K
    profile_steps: int = 16  # decode steps timed op by op, per repeat
    ttft_rounds: int = 5  # time to first token of a `prompt`-token prompt: one fresh process cold, one warm, per round
    ttft_warm_up: bool = True  # one untimed launch first (JIT cache, GEMM choice); the smoke run's earlier workloads did that
    hf_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # what transformers computes in
    repeats: int = 3
    paired_rounds: int = 5  # the targets' workloads beside their ceilings and transformers, again and again
    ceiling_repeats: int = 10
    stream_bytes: int = 2**30  # the bandwidth kernel's array: larger than every cache
    quiet_wait: float = 90.0  # seconds a workload may spend in all waiting for other processes to leave the CPUs


SMOKE = Plan(
    shapes=("tiny",), dtypes=("bf16",), headline="tiny-bf16", prompt=16, new_tokens=6, slow_new_tokens=4,
    numpy_new_tokens=4, prefill_prompts=(16,), contexts=(32,), context_new_tokens=4, hf_context_new_tokens=4,
    profile_steps=3, ttft_rounds=1, ttft_warm_up=False, hf_dtypes=("float32",), repeats=2, paired_rounds=1,
    ceiling_repeats=3, stream_bytes=2**26, quiet_wait=0.0,
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
    work: list[Workload] = []
    mmap_file = str(ckpt_root / checkpoint_name(plan.shapes[0], "bf16") / "model.safetensors")
    for n in sorted({1, threads}):
        work.append(_bandwidth(plan, n, "ceiling", "bandwidth", mmap_file))
        work.append(_gemm(plan, n, "ceiling", "gemm", ckpt_root, plan.shapes, plan.prefill_prompts))

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
    work.extend(_paired_rounds(plan, threads, ckpt_root))
    # The host's memory bandwidth and GEMM throughput drift (other virtual machines); measuring them
    # again shows by how much, and the ceilings take the higher of the two.
    work.append(_bandwidth(plan, threads, "ceiling", "bandwidth-end", mmap_file))
    work.append(_gemm(plan, threads, "ceiling", "gemm-end", ckpt_root, plan.shapes, plan.prefill_prompts))
    for w in work:
        w.spec["quiet_wait"] = plan.quiet_wait
    return work


def _headline_extras(model: str, ckpt: str, threads: int, plan: Plan) -> list[Workload]:
    """The context sweep, the KV cache dtypes at the longest context, the numpy backend, 1-thread scaling, the
    time to first token (checkpoint cold and warm) and the op-by-op profile of one checkpoint."""
    work = [_decode(f"qwen-ref/numba/{model}/decode-ctx-{ctx}/{threads}t", "qwen_decode", ckpt, threads, plan,
                    backend="numba", new_tokens=plan.context_new_tokens, context=ctx) for ctx in plan.contexts]
    ctx = plan.contexts[-1]  # one workload, one measurement per dtype: .../decode-ctx-{ctx}-kv-{dtype}/{threads}t
    work.append(_decode(f"qwen-ref/numba/{model}/decode-ctx-{ctx}-kv/{threads}t", "qwen_decode", ckpt, threads, plan,
                        backend="numba", new_tokens=plan.context_new_tokens, context=ctx,
                        kv_dtypes=list(plan.kv_dtypes), model=model))
    work.append(_decode(f"qwen-ref/numpy/{model}/decode/{threads}t", "qwen_decode", ckpt, threads, plan,
                        backend="numpy", new_tokens=plan.numpy_new_tokens))
    if threads > 1:
        work.append(_decode(f"qwen-ref/numba/{model}/decode/1t", "qwen_decode", ckpt, 1, plan, backend="numba",
                            new_tokens=plan.new_tokens))
        work.append(_prefill(f"qwen-ref/numba/{model}/prefill-{plan.prefill_prompts[-1]}/1t", "qwen_prefill", ckpt,
                             1, plan, plan.prefill_prompts[-1], backend="numba"))
    work.append(Workload(f"qwen-ref/numba/{model}/ttft-{plan.prompt}/{threads}t", {
        "kind": "ttft", "threads": threads, "model": model, "model_dir": ckpt, "prompt": plan.prompt,
        "repeats": plan.ttft_rounds, "warm_up": plan.ttft_warm_up}))
    work.append(Workload(f"profile/numba/{model}/{threads}t", {"kind": "profile", "threads": threads,
                "model": model, "model_dir": ckpt, "contexts": list(plan.contexts), "steps": plan.profile_steps,
                "prompt": plan.prefill_prompts[-1], "repeats": plan.repeats}))
    return work


def _paired_rounds(plan: Plan, threads: int, ckpt_root: Path) -> list[Workload]:
    """The headline's target workloads again, each beside what it is compared with, round after round.

    The host's speed drifts by 15% within minutes, and the main list measures a workload, its
    transformers baseline and the machine's ceilings minutes apart. In each round qwen-ref decodes
    (at the longest context, then at the prompt's) between two streaming reads, and transformers
    decodes right after; qwen-ref's prefill of each prompt length runs between two GEMM runs, each
    followed by transformers'.
    The decodes also read the streaming ceiling in their own process just before and after each
    repeat (`ceiling_beside`), seconds from the tokens they bound rather than a minute: the host's
    bandwidth moves by 20% within a minute. A fraction or ratio from one round compares figures
    taken under the same state of the host, and the targets use the median over the rounds.
    """
    shape, dtype = plan.headline.split("-")
    ours, theirs = str(ckpt_root / checkpoint_name(shape, dtype)), str(ckpt_root / checkpoint_name(shape, "bf16"))
    ctx = plan.contexts[-1]
    work = []
    for r in range(1, plan.paired_rounds + 1):
        # only the anon read and the headline's GEMM: the prefill's ceiling, and for the decodes (which read
        # theirs in their own process) the figure a minute apart
        ceiling = f"paired/{r}/ceiling"
        work += [
            _bandwidth(plan, threads, ceiling, "bandwidth", mmap_file=""),
            _decode(f"paired/{r}/qwen-ref/numba/{plan.headline}/decode-ctx-{ctx}/{threads}t", "qwen_decode", ours,
                    threads, plan, backend="numba", new_tokens=plan.context_new_tokens, context=ctx,
                    ceiling_beside=plan.stream_bytes),
            _decode(f"paired/{r}/qwen-ref/numba/{plan.headline}/decode/{threads}t", "qwen_decode", ours, threads, plan,
                    backend="numba", new_tokens=plan.new_tokens, ceiling_beside=plan.stream_bytes),
            _bandwidth(plan, threads, ceiling, "bandwidth-after", mmap_file=""),
            _decode(f"paired/{r}/transformers/float32/{shape}/decode/{threads}t", "hf_decode", theirs, threads, plan,
                    torch_dtype="float32", new_tokens=plan.new_tokens),
            _gemm(plan, threads, ceiling, "gemm", ckpt_root, (shape,), plan.prefill_prompts),
        ]
        for P in plan.prefill_prompts:
            work += [_prefill(f"paired/{r}/qwen-ref/numba/{plan.headline}/prefill-{P}/{threads}t", "qwen_prefill", ours,
                              threads, plan, P, backend="numba"),
                     _prefill(f"paired/{r}/transformers/float32/{shape}/prefill-{P}/{threads}t", "hf_prefill", theirs,
                              threads, plan, P, torch_dtype="float32")]
        work.append(_gemm(plan, threads, ceiling, "gemm-after", ckpt_root, (shape,), plan.prefill_prompts))
    return work


def _bandwidth(plan: Plan, threads: int, prefix: str, label: str, mmap_file: str) -> Workload:
    """The streaming read of an anonymous array, and of `mmap_file` as qwen-ref maps weights (if not "")."""
    return Workload(f"{prefix}/{label}/{threads}t", {
        "kind": "bandwidth", "threads": threads, "prefix": prefix, "label": label, "stream_bytes": plan.stream_bytes,
        "repeats": plan.ceiling_repeats, "mmap_file": mmap_file})


def _gemm(plan: Plan, threads: int, prefix: str, label: str, ckpt_root: Path, shapes: tuple[str, ...],
          prompts: tuple[int, ...]) -> Workload:
    """BLAS on the matrices of a layer of each shape, at each prompt length."""
    return Workload(f"{prefix}/{label}/{threads}t", {
        "kind": "gemm", "threads": threads, "prefix": prefix, "label": label, "repeats": plan.ceiling_repeats,
        "prompts": list(prompts), "shapes": {s: str(ckpt_root / checkpoint_name(s, "bf16")) for s in shapes}})


def _decode(name, kind, ckpt, threads, plan, new_tokens, context=None, **impl) -> Workload:
    spec = {"kind": kind, "threads": threads, "model_dir": ckpt, "prompt": plan.prompt, "new_tokens": new_tokens,
            "context": context, "repeats": plan.repeats, **impl}
    return Workload(name, spec, {"work": "decode", "context": context})


def _prefill(name, kind, ckpt, threads, plan, prompt, **impl) -> Workload:
    spec = {"kind": kind, "threads": threads, "model_dir": ckpt, "prompt": prompt, "repeats": plan.repeats, **impl}
    return Workload(name, spec, {"work": "prefill"})
