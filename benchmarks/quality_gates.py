"""Quality-gate cost per layer beside that layer's transform, on synthetic IoT telemetry.

    .venv/bin/python benchmarks/quality_gates.py             # 1M rows
    .venv/bin/python benchmarks/quality_gates.py --rows 10000000

Target: a gate adds at most 25% to its layer's transform time. No object store is needed: the
transforms and gates are the same pure functions the lake jobs call, called the way
`pipelines.jobs.lake` calls them (bronze: one gate per record batch of the streaming reader, on an
Arrow-backed frame; silver and gold: one gate per partition).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.contracts import load_contract
from pipelines.datasets import effective_params
from pipelines.layers.bronze import iter_landing_batches
from pipelines.layers.gold import to_gold
from pipelines.layers.partitioning import split_by_event_date
from pipelines.layers.silver import to_silver
from pipelines.quality import validate_partition
from pipelines.settings import load_params

TARGET = 0.25


def synthetic_csv(rows: int, devices: int = 50, seed: int = 0) -> bytes:
    """Valid telemetry for one day: `devices` devices, evenly spaced readings."""
    rng = np.random.default_rng(seed)
    per_device = -(-rows // devices)
    start = int(dt.datetime(2026, 1, 5, tzinfo=dt.UTC).timestamp())
    step = 86_400 / per_device
    ts = start + np.tile(np.arange(per_device) * step, devices)[:rows]
    frame = pd.DataFrame(
        {
            "ts": np.round(ts, 3),
            "device": np.repeat([f"device-{i + 1:02d}" for i in range(devices)], per_device)[:rows],
            "co": rng.uniform(0.001, 0.01, rows).round(6),
            "humidity": rng.uniform(30, 70, rows).round(2),
            "light": rng.integers(0, 2, rows).astype(bool),
            "lpg": rng.uniform(0.002, 0.01, rows).round(6),
            "motion": rng.integers(0, 2, rows).astype(bool),
            "smoke": rng.uniform(0.005, 0.03, rows).round(6),
            "temp": rng.normal(22, 3, rows).round(2),
            "fault": np.where(rng.random(rows) < 0.02, "spike", ""),
        }
    )
    return frame.to_csv(index=False).encode()


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def bronze_streaming(data: bytes, contract, partition: str, config: dict | None, now: dt.datetime):
    """Bronze as `pipelines.jobs.lake.build_bronze` runs it: the streaming reader's record batches,
    each split by event date (the transform) and gated as an Arrow-backed frame (the gate)."""
    batches = iter_landing_batches(
        io.BufferedReader(io.BytesIO(data), buffer_size=1 << 20),
        source_key=f"s3://landing/{contract.name}/{partition}/bench.csv",
        source_etag="e",
        run_id="b",
        ingested_at=now,
        contract=contract,
    )
    kept, results, transform, gate = [], [], 0.0, 0.0
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            transform += time.perf_counter() - started
            break
        table = pa.Table.from_batches([batch])
        split_by_event_date(table, contract, partition)
        transform += time.perf_counter() - started
        started = time.perf_counter()
        frame = table.to_pandas(types_mapper=pd.ArrowDtype)
        results.append(validate_partition(frame, "bronze", contract, partition, config=config))
        gate += time.perf_counter() - started
        kept.append(batch)
    return pa.Table.from_batches(kept), transform, gate, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per partition (default 1M)")
    parser.add_argument("--dataset", default="iot_telemetry")
    args = parser.parse_args(argv)

    contract = load_contract(args.dataset)
    params = load_params()
    config = (params.get("quality") or {}).get(contract.name, {})
    partition = "2026-01-05"
    gold_params = effective_params(contract.name)["gold"]
    window, long_window = gold_params["window"], gold_params["long_window"]
    print(f"generating {args.rows:,} rows ...", flush=True)
    data = synthetic_csv(args.rows)
    now = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)

    # warm GX up once (imports, context) so the first layer is not charged for it
    head = data[: data.index(b"\n", 20_000) + 1]
    warm, *_ = bronze_streaming(head, contract, partition, config.get("bronze"), now)
    validate_partition(to_silver(warm, contract, now=now)[0], "silver", contract, partition)

    rows = []
    bronze, t_bronze, g_bronze, results = bronze_streaming(data, contract, partition, config.get("bronze"), now)
    rows.append(("bronze", len(bronze), t_bronze, g_bronze, results))
    del data

    (silver, _), t_silver = timed(to_silver, bronze, contract, now=now)
    del bronze
    result, g_silver = timed(validate_partition, silver, "silver", contract, partition, config=config.get("silver"))
    rows.append(("silver", len(silver), t_silver, g_silver, [result]))

    reference = to_gold(silver.iloc[: min(len(silver), 50_000)], contract, window=window, long_window=long_window)
    gold, t_gold = timed(to_gold, silver, contract, window=window, long_window=long_window)
    del silver
    result, g_gold = timed(
        validate_partition, gold, "gold", contract, partition, config=config.get("gold"), reference=reference
    )
    rows.append(("gold", len(gold), t_gold, g_gold, [result]))

    print(f"\n{args.rows:,} rows, dataset {contract.name}; target: gate <= {TARGET:.0%} of transform\n")
    print(
        f"{'layer':7s} {'rows':>11s} {'transform s':>12s} {'gate s':>8s} {'ratio':>7s} "
        f"{'target met':>10s}  gate calls x expectations, outcome"
    )
    for layer, n, t, g, results in rows:
        ratio = g / t
        met = "yes" if ratio <= TARGET else "NO"
        status = "passed" if all(r.success for r in results) else "FAILED"
        checks = len(results[0].outcomes)
        print(
            f"{layer:7s} {n:11,d} {t:12.2f} {g:8.2f} {ratio:7.0%} {met:>10s}  {len(results)} x {checks}, gate {status}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
