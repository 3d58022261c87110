"""The collector accounting of the scoring service's `/status` ("gc"): pauses counted per generation."""

from __future__ import annotations

import gc


def test_collector_pauses_are_counted_per_generation():
    from pipelines.runtime import GcPauses

    pauses = GcPauses()
    pauses.install()
    pauses.install()  # once, however often
    try:
        assert gc.callbacks.count(pauses._callback) == 1
        gc.collect(0)
        gc.collect()
        summary = pauses.summary()
    finally:
        gc.callbacks.remove(pauses._callback)
    assert set(summary) == {"gen0", "gen1", "gen2"}
    assert summary["gen0"]["collections"] >= 1 and summary["gen2"]["collections"] >= 1
    assert summary["gen2"]["longest_ms"] >= 0 and summary["gen2"]["total_ms"] >= summary["gen2"]["longest_ms"] - 0.1
