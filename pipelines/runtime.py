"""The interpreter's heap in long-running services: the scoring service and the stream's processes.

`settle_heap` once the libraries, models and warm state are loaded:
- `gc.freeze()`: those ~1M long-lived objects leave the collector's walks (a full collection had
  walked them with the event loop stopped: 0.7-0.9 s, every few seconds under load);
- a young-generation threshold above a busy process's in-flight working set. A young collection runs
  once 700 more container objects were allocated than freed; each request in flight holds some 50
  (scope, headers, coroutine, future, records), so at 64 connections the working set alone crossed
  that ~4 times a batch: 4,248 young and 387 older collections in 10 s, up to 8 ms each with every
  request in flight waiting, against 202 at 8 connections. Above it, a collection runs for real
  garbage only.

`GC_PAUSES` counts the collector's pauses per generation (the scoring service's `/status`).
"""

from __future__ import annotations

import gc
import time
from typing import Any

GC_YOUNG_THRESHOLD = 50_000


def settle_heap(young_threshold: int = GC_YOUNG_THRESHOLD) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, *gc.get_threshold()[1:])
    GC_PAUSES.install()


class GcPauses:
    """The cyclic collector's pauses in this process, per generation: every request in flight waits
    them out (the event loop stops), so a tail latency has to be read beside them."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 2)
        elapsed = time.perf_counter() - self._started
        self.count[generation] += 1
        self.total[generation] += elapsed
        self.longest[generation] = max(self.longest[generation], elapsed)

    def summary(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "collections": self.count[g],
                "total_ms": round(1000 * self.total[g], 1),
                "longest_ms": round(1000 * self.longest[g], 2),
            }
            for g in range(3)
        }


GC_PAUSES = GcPauses()
