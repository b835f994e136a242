"""`suite make --workers N | --cluster ADDRESS`: the cases of a suite computed on a dask.distributed cluster.

Each worker process loads the model once, when it joins (a WorkerPlugin: `load_model` memory-maps
the checkpoint, so the workers of one machine share its pages in the page cache), and takes whole
cases; a case's file is written by the worker that computed it, so the folder must be on a file
system every worker sees, at the same path (as must the checkpoint). A worker that dies mid-case has
its case rescheduled on another; a killed driver takes a local cluster's workers with it and the next
run resumes from the files that exist.

dask.distributed rather than Ray because, on the 2-core host measured, it started faster, used a third of
the memory before any model loaded, and left no process behind a killed driver (benchmarks/suite_cluster_choice.md).
A worker's memory monitor counts the mapped checkpoint pages it has read as its own memory, though
the page cache holds them once: so the local cluster runs without a memory limit, and the workers of
an existing cluster should be started with `--memory-limit 0` (or a limit above the checkpoint's size).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import dask
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from qwen_ref.errors import QwenRefError
from qwen_ref.suite_make import CaseJob, ModelSpec, Report
from qwen_ref.threads import available_cores, set_threads


class _ModelOnWorker(WorkerPlugin):
    """Loads the model once per worker process and keeps it for every case that worker runs."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = "qwen-ref-suite-" + hashlib.sha256(repr(spec).encode()).hexdigest()[:16]
        self.model = None

    def setup(self, worker) -> None:
        # dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, so that freed memory goes back
        # to the OS at once; load_model's keep_freed_memory takes that for the user's own malloc tuning and
        # leaves it, and every [V] float64 row the compaction makes faults its pages in again (measured:
        # compact_reference 3x slower on a worker). Only dask's own default is undone, before the load.
        dask_default = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", None)
        if dask_default is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(dask_default):
            del os.environ["MALLOC_TRIM_THRESHOLD_"]
        self.model = self.spec.load()


def _run_job(job: CaseJob, plugin_name: str) -> tuple[int, float]:
    """On a worker: (job index, seconds) after writing the job's case file."""
    plugin = get_worker().plugins[plugin_name]
    # numba's thread count belongs to the calling thread, and tasks run on the worker's executor thread,
    # not where setup ran: set here (0.3 ms), or each worker would use every core and oversubscribe them
    set_threads(plugin.spec.threads)
    return job.index, job.run(plugin.model)


def run_on_cluster(spec: ModelSpec, jobs: list[CaseJob], report: Report, workers: int | None = None,
                   address: str | None = None, quiet: bool = False) -> None:
    """Run `jobs` on a new local cluster of `workers` processes, or on the cluster at `address`."""
    started = time.perf_counter()
    cluster = None
    try:
        if address is None:
            # one worker process per share of the cores, one task at a time each: numba and BLAS threads
            # inside a worker use its share, so N workers do not oversubscribe the machine
            per_worker = max(1, available_cores() // workers)
            spec = ModelSpec(spec.model_dir, spec.backend, spec.kv_dtype, spec.layer_major, spec.threads or per_worker)
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            client = Client(address, timeout=10)
    except OSError as exc:  # no scheduler at the address, or the local one could not start
        raise QwenRefError(f"cannot reach the dask cluster{f' at {address}' if address else ''}: {exc}") from None
    plugin = _ModelOnWorker(spec)
    try:
        client.register_plugin(plugin)  # returns once every worker has loaded the model
        if not quiet:
            print(f"dask: {len(client.scheduler_info()['workers'])} workers have loaded the model in "
                  f"{time.perf_counter() - started:.2f} s", file=sys.stderr)
        by_index = {job.index: job for job in jobs}
        futures = [client.submit(_run_job, job, plugin.name, key=f"{plugin.name}-case-{job.index}", pure=False)
                   for job in jobs]
        for future in as_completed(futures):
            index, seconds = future.result()  # re-raises a worker's exception here
            report(by_index[index], seconds)
    except QwenRefError as exc:  # a worker's, which may see other paths than this machine: say whose
        raise QwenRefError(f"on a dask worker: {exc}") from None
    finally:
        if address is not None:
            client.unregister_worker_plugin(plugin.name)  # frees the model on a cluster that lives on
        client.close()
        if cluster is not None:
            cluster.close()
