"""Quality-gate cost per layer beside that layer's transform, on synthetic IoT telemetry.

    .venv/bin/python benchmarks/quality_gates.py             # 1M rows
    .venv/bin/python benchmarks/quality_gates.py --rows 10000000

Target: a gate adds at most 25% to its layer's transform time. No object store is needed: the
transforms and gates are the same pure functions the lake jobs call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import numpy as np
import pandas as pd

from pipelines.contracts import load_contract
from pipelines.layers.bronze import parse_landing_csv
from pipelines.layers.gold import to_gold
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per partition (default 1M)")
    parser.add_argument("--dataset", default="iot_telemetry")
    args = parser.parse_args(argv)

    contract = load_contract(args.dataset)
    config = (load_params().get("quality") or {}).get(contract.name, {})
    partition = "2026-01-05"
    window = int(load_params()["gold"]["window"])
    print(f"generating {args.rows:,} rows ...", flush=True)
    data = synthetic_csv(args.rows)
    now = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
    key = f"s3://landing/{contract.name}/{partition}/bench.csv"

    # warm GX up once (imports, context) so the first layer is not charged for it
    head = data[: data.index(b"\n", 20_000) + 1]
    warm = parse_landing_csv(
        head, source_key=key, source_etag="e", run_id="b", ingested_at=now, contract=contract
    )
    validate_partition(to_silver(warm, contract, now=now)[0], "silver", contract, partition)

    rows = []
    bronze, t_bronze = timed(
        parse_landing_csv,
        data,
        source_key=key,
        source_etag="e",
        run_id="b",
        ingested_at=now,
        contract=contract,
    )
    records = data.count(b"\n") - 1

    def bronze_gate():
        return validate_partition(
            bronze.to_pandas(),
            "bronze",
            contract,
            partition,
            config=config.get("bronze"),
            expected_row_count=records,
        )

    result, g_bronze = timed(bronze_gate)
    rows.append(("bronze", t_bronze, g_bronze, result))

    (silver, _), t_silver = timed(to_silver, bronze, contract, now=now)
    result, g_silver = timed(
        validate_partition, silver, "silver", contract, partition, config=config.get("silver")
    )
    rows.append(("silver", t_silver, g_silver, result))

    reference = to_gold(silver.iloc[: min(len(silver), 50_000)], contract, window=window)
    gold, t_gold = timed(to_gold, silver, contract, window=window)
    result, g_gold = timed(
        validate_partition, gold, "gold", contract, partition, config=config.get("gold"), reference=reference
    )
    rows.append(("gold", t_gold, g_gold, result))

    print(f"\n{args.rows:,} rows, dataset {contract.name}; target: gate <= {TARGET:.0%} of transform\n")
    print(f"{'layer':7s} {'transform s':>12s} {'gate s':>8s} {'ratio':>7s} {'expectations':>13s}  verdict")
    for layer, t, g, result in rows:
        ratio = g / t
        verdict = "ok" if ratio <= TARGET else "OVER"
        status = "passed" if result.success else "FAILED"
        n = len(result.outcomes)
        print(f"{layer:7s} {t:12.2f} {g:8.2f} {ratio:7.0%} {n:13d}  {verdict} (gate {status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
