"""Lake jobs per layer and partition: read the layer below, transform, gate with GX, publish atomically."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from pipelines import storage
from pipelines.settings import get_settings, load_params
from pipelines.storage import ObjectStore

Progress = Callable[[str], None]


@dataclass
class LayerReport:
    layer: str
    dataset: str
    partition: str
    rows_in: int
    rows_out: int
    quarantined: int = 0
    quality: dict[str, Any] = field(default_factory=dict)
    manifest_key: str = ""
    content_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _contract(dataset: str):
    from pipelines.contracts import load_contract

    return load_contract(dataset)


def _gate(df: pd.DataFrame, layer: str, contract, partition: str, progress: Progress, **kwargs) -> dict:
    """Run the layer's GX suite; a critical failure raises before anything is published."""
    from pipelines.quality import enforce, validate_partition

    config = (load_params().get("quality") or {}).get(contract.name, {}).get(layer)
    result = validate_partition(df, layer, contract, partition, config=config, **kwargs)
    progress(result.summary())
    enforce(result)
    return result.to_dict()


def _put_quality(store: ObjectStore, layer: str, dataset: str, partition: str, quality: dict) -> None:
    key = f"quality/{layer}/{dataset}/event_date={partition}/validation.json"
    store.put_bytes(
        store.settings.lake_bucket, key, json.dumps(quality, default=str).encode(), "application/json"
    )


# -- landing ------------------------------------------------------------------------------------
def land_bytes(store: ObjectStore, dataset: str, partition: str, filename: str, data: bytes) -> str:
    """Land a delivered file as-is (never modified later) under landing/<dataset>/<date>/."""
    key = storage.landing_prefix(dataset, partition) + filename
    store.put_bytes(store.settings.landing_bucket, key, data, "text/csv")
    return key


def land_simulated_days(
    start: dt.date, days: int, *, store: ObjectStore | None = None, progress: Progress = print
) -> list[str]:
    from pipelines.simulator import simulate_day_csv

    store = store or ObjectStore()
    p = load_params()["simulate"]
    keys = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        data = simulate_day_csv(day, devices=p["devices"], freq_seconds=p["freq_seconds"], seed=p["seed"])
        keys.append(land_bytes(store, get_settings().dataset, day.isoformat(), f"telemetry-{day}.csv", data))
        progress(f"[land] {keys[-1]} ({len(data) / 1e6:.1f} MB)")
    return keys


# -- bronze -------------------------------------------------------------------------------------
def build_bronze(
    partition: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: ObjectStore | None = None,
    progress: Progress = print,
) -> LayerReport:
    from pipelines.layers.bronze import parse_landing_csv

    store = store or ObjectStore()
    dataset = dataset or store.settings.dataset
    contract = _contract(dataset)
    bucket = store.settings.landing_bucket
    keys = [
        k for k in store.list_keys(bucket, storage.landing_prefix(dataset, partition)) if not k.endswith("/")
    ]
    if not keys:
        raise FileNotFoundError(
            f"No landed files for {dataset} on {partition} under s3://{bucket}/"
            f"{storage.landing_prefix(dataset, partition)}; land data first (`platform land`)."
        )
    now = dt.datetime.now(dt.UTC)
    tables, rows, expected = [], 0, 0
    for key in keys:
        data = store.get_bytes(bucket, key)
        table = parse_landing_csv(
            data,
            source_key=f"s3://{bucket}/{key}",
            source_etag=store.etag(bucket, key),
            run_id=run_id,
            ingested_at=now,
            contract=contract,
        )
        tables.append(table)
        rows += table.num_rows
        progress(f"[bronze] {key}: {table.num_rows} records")
    bronze = pa.concat_tables(tables, promote_options="default")
    expected = rows
    quality = _gate(bronze.to_pandas(), "bronze", contract, partition, progress, expected_row_count=expected)
    manifest = storage.publish_partition(
        store, "bronze", dataset, partition, bronze, run_id, extra={"sources": keys}
    )
    _put_quality(store, "bronze", dataset, partition, quality)
    return LayerReport(
        "bronze",
        dataset,
        partition,
        rows,
        manifest.rows,
        quality=_short(quality),
        manifest_key=storage.partition_prefix("bronze", dataset, partition) + storage.MANIFEST_NAME,
        content_sha256=manifest.content_sha256,
    )


# -- silver -------------------------------------------------------------------------------------
def build_silver(
    partition: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: ObjectStore | None = None,
    progress: Progress = print,
) -> LayerReport:
    from pipelines.layers.silver import to_silver

    store = store or ObjectStore()
    dataset = dataset or store.settings.dataset
    contract = _contract(dataset)
    bronze = storage.read_partition(store, "bronze", dataset, partition)
    silver, quarantine = to_silver(bronze, contract)
    progress(
        f"[silver] {partition}: {bronze.num_rows} in -> {len(silver)} silver, {len(quarantine)} quarantined"
    )
    quality = _gate(silver, "silver", contract, partition, progress)
    # Quarantine first: a bad record is never lost, even if the silver publish fails next.
    storage.publish_partition(
        store,
        "quarantine",
        dataset,
        partition,
        pa.Table.from_pandas(quarantine.astype(str) if len(quarantine) else quarantine, preserve_index=False),
        run_id,
    )
    manifest = storage.publish_partition(
        store, "silver", dataset, partition, pa.Table.from_pandas(silver, preserve_index=False), run_id
    )
    _put_quality(store, "silver", dataset, partition, quality)
    return LayerReport(
        "silver",
        dataset,
        partition,
        bronze.num_rows,
        manifest.rows,
        quarantined=len(quarantine),
        quality=_short(quality),
        manifest_key=storage.partition_prefix("silver", dataset, partition) + storage.MANIFEST_NAME,
        content_sha256=manifest.content_sha256,
    )


# -- gold ---------------------------------------------------------------------------------------
def build_gold(
    partition: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: ObjectStore | None = None,
    progress: Progress = print,
) -> LayerReport:
    from pipelines.layers.gold import to_gold

    store = store or ObjectStore()
    dataset = dataset or store.settings.dataset
    contract = _contract(dataset)
    window = int(load_params()["gold"]["window"])
    silver = storage.read_partition(store, "silver", dataset, partition).to_pandas()
    # Warm-up: the previous day's tail, so rolling features at midnight see the readings before it.
    previous = (dt.date.fromisoformat(partition) - dt.timedelta(days=1)).isoformat()
    warmup = None
    if storage.read_manifest(store, "silver", dataset, previous) is not None:
        prev = storage.read_partition(store, "silver", dataset, previous).to_pandas()
        warmup = prev.sort_values("ts").groupby("device", group_keys=False).tail(window)
    gold = to_gold(silver, contract, window=window, warmup=warmup)
    reference = _gold_reference(store, dataset, partition)
    quality = _gate(gold, "gold", contract, partition, progress, reference=reference)
    manifest = storage.publish_partition(
        store, "gold", dataset, partition, pa.Table.from_pandas(gold, preserve_index=False), run_id
    )
    _put_quality(store, "gold", dataset, partition, quality)
    progress(f"[gold] {partition}: {len(gold)} feature rows")
    return LayerReport(
        "gold",
        dataset,
        partition,
        len(silver),
        manifest.rows,
        quality=_short(quality),
        manifest_key=storage.partition_prefix("gold", dataset, partition) + storage.MANIFEST_NAME,
        content_sha256=manifest.content_sha256,
    )


def _gold_reference(store: ObjectStore, dataset: str, partition: str) -> pd.DataFrame | None:
    """The latest earlier gold partition: the reference window for drift bounds."""
    earlier = [p for p in storage.list_partitions(store, "gold", dataset) if p < partition]
    if not earlier:
        return None
    return storage.read_partition(store, "gold", dataset, earlier[-1]).to_pandas()


def _short(quality: dict) -> dict:
    keep = ("layer", "partition", "success", "statistics")
    return {k: quality.get(k) for k in keep if k in quality}


# -- reading gold for training ------------------------------------------------------------------
def read_gold(
    partitions: list[str] | None = None, *, dataset: str | None = None, store: ObjectStore | None = None
) -> tuple[pd.DataFrame, dict]:
    """All (or the given) gold partitions and a snapshot naming exactly what was read."""
    store = store or ObjectStore()
    dataset = dataset or store.settings.dataset
    partitions = partitions or storage.list_partitions(store, "gold", dataset)
    if not partitions:
        raise storage.StorageError(f"No gold partitions for {dataset}: run the lakehouse DAG first.")
    frames, snapshot = [], {"dataset": dataset, "bucket": store.settings.lake_bucket, "partitions": {}}
    for p in partitions:
        manifest = storage.read_manifest(store, "gold", dataset, p)
        frames.append(storage.read_partition(store, "gold", dataset, p).to_pandas())
        snapshot["partitions"][p] = {
            "run_id": manifest.run_id,
            "rows": manifest.rows,
            "content_sha256": manifest.content_sha256,
        }
    import hashlib

    snapshot["content_sha256"] = hashlib.sha256(
        "".join(v["content_sha256"] for _, v in sorted(snapshot["partitions"].items())).encode()
    ).hexdigest()
    return pd.concat(frames, ignore_index=True), snapshot


def read_quality(
    layer: str, partitions: list[str], *, dataset: str | None = None, store: ObjectStore | None = None
) -> dict[str, Any]:
    store = store or ObjectStore()
    dataset = dataset or store.settings.dataset
    out = {}
    for p in partitions:
        key = f"quality/{layer}/{dataset}/event_date={p}/validation.json"
        if store.exists(store.settings.lake_bucket, key):
            out[p] = json.loads(store.get_bytes(store.settings.lake_bucket, key))
    return out


def partition_from_context(context: dict[str, Any]) -> str:
    """The event date a DAG run owns: conf `partition_date` if given, else its data interval's start."""
    conf = (context.get("dag_run").conf if context.get("dag_run") else None) or {}
    if conf.get("partition_date"):
        return dt.date.fromisoformat(str(conf["partition_date"])).isoformat()
    start = context.get("data_interval_start") or context.get("logical_date")
    if start is None:
        raise ValueError(
            "This run has no data interval or logical date: trigger it with "
            'conf {"partition_date": "YYYY-MM-DD"}.'
        )
    return start.date().isoformat()
