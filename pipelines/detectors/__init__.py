"""Streaming, causal, unsupervised anomaly detectors for single sensor/metric series.

Every detector is a small class with a config dataclass (``Config``; defaults are the values chosen
by measurement on NAB, see ``benchmarks/nab.py``) and

* ``new_state()``: fresh per-series state (plain Python data, serialisable);
* ``update(state, timestamp, value) -> float``: score of one reading in [0, 1], mutating ``state``;
  it uses only this reading and earlier ones;
* ``score_series(timestamps, values, state=None) -> np.ndarray``: the same scores for a series in
  time order (identical to successive ``update`` calls; continues ``state`` if given);
* ``score_many(states, series) -> list[np.ndarray]``: ``score_series`` for many states at once,
  each at most once (a live pass steps a few readings of every device and reading together).

NaN/inf readings score 0 and leave the state unchanged.
"""

from __future__ import annotations

from pipelines.detectors.contextual import ContextualConfig, ContextualDetector, ContextualState

DETECTORS: dict[str, type] = {
    ContextualDetector.name: ContextualDetector,
}
DEFAULT_DETECTOR: str = ContextualDetector.name

__all__ = [
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "ContextualConfig",
    "ContextualDetector",
    "ContextualState",
]
