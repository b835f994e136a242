"""`qwen-ref suite make`: the reference of every case of a prompts file, one file per case, resumable.

The driver reads and tokenizes the prompts, writes `manifest.json` and `cases.jsonl`, then computes
the cases that have no file yet: here, one after another (the default), or on a dask.distributed
cluster (`--workers N` starts a local one, `--cluster ADDRESS` joins one; `qwen_ref.suite_cluster`).
Whoever computes a case writes its file, so a run killed at any point resumes where it stopped, and
the files are the same bytes whichever way, or in whatever order, they were computed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_ref.backends import get_backend
from qwen_ref.errors import QwenRefError
from qwen_ref.model import QwenModel, load_model
from qwen_ref.suite_cases import Case, case_file_name, read_cases
from qwen_ref.suite_manifest import build_manifest, start_suite
from qwen_ref.suite_reference import is_case_done, make_case
from qwen_ref.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model: all a cluster worker needs to load the same one for itself."""

    model_dir: Path  # absolute: a worker may start in another folder
    backend: str
    kv_dtype: str
    layer_major: bool | None
    threads: int | None  # per worker process; None: every core it has

    def load(self) -> QwenModel:
        return load_model(self.model_dir, get_backend(self.backend), kv_dtype=self.kv_dtype,
                          layer_major=self.layer_major)


@dataclass(frozen=True)
class CaseJob:
    """What computing one case takes besides the model (picklable, sent to workers)."""

    index: int
    case: Case
    path: Path  # absolute path of its case file
    top_k: int
    full_logits: bool
    prefill_chunk: int

    def run(self, model: QwenModel) -> float:
        return make_case(model, self.case, self.path, self.top_k, self.full_logits, self.prefill_chunk)


Report = Callable[[CaseJob, float], None]


def prepare(spec: ModelSpec, prompts: Path, out_dir: Path, top_k: int, full_logits: bool,
            prefill_chunk: int) -> tuple[QwenModel, list[CaseJob], int]:
    """Read the cases, start (or check) the suite folder; the model, the jobs still to do and the case count."""
    model = spec.load()
    tokenizer = Tokenizer.from_model_dir(spec.model_dir)
    cases = read_cases(prompts, spec.model_dir, tokenizer, model.config.vocab_size,
                       model.config.max_position_embeddings)
    manifest = build_manifest(spec.model_dir, model, tokenizer, prompts, cases, top_k, full_logits, prefill_chunk)
    start_suite(out_dir, manifest, cases)
    out_dir = out_dir.resolve()
    jobs = [CaseJob(i, case, out_dir / case_file_name(i), top_k, full_logits, prefill_chunk)
            for i, case in enumerate(cases)]
    return model, [job for job in jobs if not is_case_done(job.path, job.case)], len(cases)


def run_local(model: QwenModel, jobs: list[CaseJob], report: Report) -> None:
    """Every job in this process, in suite order."""
    for job in jobs:
        report(job, job.run(model))


def progress_reporter(total: int, todo: int, quiet: bool) -> Report:
    """A line on stderr per case done: `[done/total] id: T tokens, seconds`."""
    done = [total - todo]

    def report(job: CaseJob, seconds: float) -> None:
        done[0] += 1
        if not quiet:
            print(f"[{done[0]}/{total}] {job.case.id}: {len(job.case.tokens)} tokens, {seconds:.2f} s",
                  file=sys.stderr, flush=True)

    return report


def make_suite(spec: ModelSpec, prompts: Path, out_dir: Path, top_k: int, full_logits: bool, prefill_chunk: int,
               workers: int | None = None, cluster: str | None = None, quiet: bool = False) -> int:
    """Make (or finish) a suite folder; returns the number of cases computed by this run."""
    if workers is not None and cluster is not None:
        raise QwenRefError("give --workers (a local cluster) or --cluster (an existing one), not both")
    started = time.perf_counter()
    model, jobs, total = prepare(spec, prompts, out_dir, top_k, full_logits, prefill_chunk)
    if not quiet and len(jobs) < total:
        print(f"resuming: {total - len(jobs)} of {total} cases already in {out_dir}", file=sys.stderr)
    report = progress_reporter(total, len(jobs), quiet)
    if jobs and (workers is not None or cluster is not None):
        try:  # the optional `cluster` extra, imported only when asked for
            from qwen_ref.suite_cluster import run_on_cluster
        except ImportError as exc:
            raise QwenRefError(f"--workers and --cluster need dask's distributed ({exc}): "
                               "pip install 'qwen-ref[cluster]'") from None
        run_on_cluster(spec, jobs, report, workers=workers, address=cluster, quiet=quiet)
    else:
        run_local(model, jobs, report)
    if not quiet:
        print(f"suite of {total} cases in {out_dir}: {len(jobs)} computed in {time.perf_counter() - started:.2f} s",
              file=sys.stderr)
    return len(jobs)
