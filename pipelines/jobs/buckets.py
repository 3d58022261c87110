"""Device buckets of one partition worked on side by side, in forked worker processes.

A silver or gold task works through its partition in buckets of whole devices; buckets are
independent (deduplication and rolling windows never cross devices), and most of a bucket's cost
is Python (pandas, the GX gate) that one process runs on one core. `map_buckets` runs the buckets
in `lake.workers` processes (0: one per core) and hands back their results in bucket order, so the
task process alone encodes, uploads and commits: the partition's files and manifest are the same
whatever the number of workers (a test compares them), and readers still only see a committed
partition.

Workers are forked from the task process after it has read the partition's encoded files and
built its GX context, so they start in milliseconds and share those pages instead of copying
them. At most `2 * workers` bucket results are in flight, so memory is bounded by the bucket size
times the workers, never by the partition. A failing bucket (a critical gate failure included)
stops the remaining ones and raises in the task process, which then aborts its writers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator

from pipelines.settings import load_params

# What forked workers inherit from the task process: set for the duration of one `map_buckets`.
_shared: Any = None


def shared() -> Any:
    """The task's shared state (the partition's files, contract, ...) inside a bucket worker."""
    if _shared is None:
        raise RuntimeError("no bucket map is running in this process")
    return _shared


def workers_for(buckets: int, requested: int | None = None) -> int:
    """Worker processes for `buckets` buckets: `requested`, else `lake.workers` (0 or absent: one
    per core), never more than there are buckets; 1 means the buckets run in the task process."""
    configured = requested or int((load_params().get("lake") or {}).get("workers", 0) or 0)
    return max(1, min(configured or (os.cpu_count() or 1), buckets))


def map_buckets(work: Callable[[Any], Any], jobs: list, state: Any, workers: int) -> Iterator[Any]:
    """Yield `work(job)` for each job, in order; in `workers` forked processes when > 1.

    `work` must be a module-level function (workers receive it by name) and reads `state`
    through `shared()`. The caller consumes results as they come: one bucket's result is written
    while the next ones are computed."""
    global _shared
    if _shared is not None:
        raise RuntimeError("map_buckets does not nest")
    _shared = state
    try:
        if workers <= 1:
            for job in jobs:
                yield work(job)
            return
        yield from _forked(work, jobs, workers)
    finally:
        _shared = None


def _forked(work: Callable[[Any], Any], jobs: list, workers: int) -> Iterator[Any]:
    # fork, not spawn: a spawned worker re-imports pandas, pyarrow and GX (~2-3 s each); a forked
    # one inherits them, and the partition's files, from the task process. Every bucket is gated,
    # so the GX context is built here, once, before the fork, instead of once per worker.
    from pipelines.quality import quality_context

    quality_context()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    pending: deque[Future] = deque()
    queue = iter(jobs)
    try:
        for job in queue:
            pending.append(pool.submit(work, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            for job in queue:  # keep the window full: one new bucket per finished one
                pending.append(pool.submit(work, job))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
