"""Micro-batching: requests that arrive while a model is busy are scored together in one predict.

One IsolationForest predict costs about the same for 1 row or 256, so merging concurrent requests
(as Triton and Ray Serve do) multiplies throughput. There is no artificial delay by default: the
next batch is whatever queued during the previous predict (``wait_ms`` adds a fill window). Each
caller gets back exactly its own rows' scores, the version that produced them and the CPU time the
predict took in its thread (``compute_ms``: what the model itself cost, whatever else the process was
doing meanwhile; the canary compares models on it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


class ModelUnavailable(RuntimeError):
    pass


@dataclass
class BatchResult:
    version: str
    scores: np.ndarray
    threshold: float
    compute_ms: float  # CPU time of the batch's predict, in the predicting thread


def _timed_predict(model: Any, records: list[dict]) -> tuple[np.ndarray, float]:
    """``model.predict`` and its thread CPU time in ms. Wall time would also count the GIL waits behind
    the other model's predict and the event loop's request parsing, which a shadowed model always runs
    beside; the platform's models predict in the calling thread (``n_jobs=1``), so this is their cost."""
    start = time.thread_time()
    scores = model.predict(records)
    return scores, (time.thread_time() - start) * 1000.0


def _one_native_thread() -> None:
    """The predict thread runs OpenMP and BLAS code on one thread. HistGradientBoosting's predict is
    one OpenMP parallel region per tree (200): each ends at a barrier that needs every OpenMP thread
    on a core, and with the event loop and the clients on the same cores a barrier waits for a time
    slice, so a 10 ms predict took 50 ms to 1.5 s (the stall of issue 18). The limit is set in this
    thread because OpenMP's thread count is a per-thread setting."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


class MicroBatcher:
    def __init__(
        self,
        current_model: Callable[[], Any],
        *,
        name: str,
        max_rows: int = 1024,
        wait_ms: float = 0.0,
    ):
        self._current_model = current_model  # returns a models.LoadedModel or None, read per batch
        self.name = name
        self.max_rows = max_rows
        self.wait_s = wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"predict-{name}", initializer=_one_native_thread
        )
        self.batches = 0
        self.rows = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, rows: list[dict]) -> BatchResult:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        assert self._queue is not None, "MicroBatcher.start() was not called"
        self._queue.put_nowait((rows, fut))
        return await fut

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            n = len(items[0][0])
            if self.wait_s:
                deadline = loop.time() + self.wait_s
                while n < self.max_rows and (left := deadline - loop.time()) > 0:
                    try:
                        item = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                    items.append(item)
                    n += len(item[0])
            while n < self.max_rows and not queue.empty():
                item = queue.get_nowait()
                items.append(item)
                n += len(item[0])
            model = self._current_model()
            if model is None:
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(ModelUnavailable(f"no {self.name} model loaded"))
                continue
            records = items[0][0] if len(items) == 1 else [r for rows, _ in items for r in rows]
            try:
                if model.runs_inline(n):
                    scores, compute_ms = _timed_predict(model, records)
                else:
                    scores, compute_ms = await loop.run_in_executor(self._executor, _timed_predict, model, records)
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.rows += n
            start = 0
            for rows, fut in items:
                end = start + len(rows)
                if not fut.done():
                    fut.set_result(BatchResult(model.version, scores[start:end], model.threshold, compute_ms))
                start = end
