"""
### Lakehouse of dataset `{dataset}`: landing → bronze → silver → gold, one delivery per run

Declared for every dataset of the catalogue (a contract in `pipelines/contracts/` or in
`PLATFORM_CONTRACTS_DIR`; tuning in `params.yaml`, `datasets.{dataset}`). Contract: `{contract}`;
partitions by event **{grain}**.

Each run owns one **delivery date**: its data interval's start, or `{{"delivery_date": "YYYY-MM-DD"}}`
in a manual run's conf (any age: a delivery dated before this DAG's start date works the same).
Records are filed by their **event time**, so a delivery can touch several partitions (late data,
or a whole history delivered as one file); silver and gold are rebuilt for exactly those partitions,
in parallel (dynamic task mapping).

| task | reads | writes | gate |
| --- | --- | --- | --- |
| `bronze` | `s3://landing/{dataset}/<delivery date>/*` as delivered | `lake/bronze/{dataset}/event_date=<p>/` Parquet + lineage | GX bronze suite (structure, row count vs source) |
| `silver` (mapped) | bronze partition (all deliveries) | `lake/silver/...` typed, deduplicated; bad records → `lake/quarantine/...` with the rule broken | GX silver suite (types, keys, ranges, no future) |
| `plan_gold` | touched partitions | the gold partitions to rebuild (touched + the next, whose windows read them) | |
| `gold` (mapped) | silver partition (+ the previous one as warm-up) | `lake/gold/...` model features (windows as durations) | GX gold suite (no NaN/inf, drift bounds) |
| `gold_published` | the gold reports | the gold Asset event: schedules `{training_dag}` once the run's gold is committed | |
| `data_docs` | every stored GX validation | `lake/data-docs/` | |

Every partition is published atomically through a `_manifest.json` commit object; re-running a
delivery replaces exactly its records (idempotent). Deterministic failures (bad data, a failed
gate) fail the task at once; only I/O and service errors are retried.

Logic lives in `pipelines.jobs.lake`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from pipelines.datasets import Dataset, catalogue

default_args = {
    "owner": "data-platform",
    "retries": 3,  # I/O only: pipelines.jobs.failures.run_task fails deterministic errors at once
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
}


def rebuild_silver_and_gold(name: str, partitions, silver_asset: Asset, gold_asset: Asset):
    """silver (mapped) -> plan_gold -> gold (mapped) -> gold_published, for the partitions an upstream
    task returns: one definition for the batch and the live path's DAGs."""

    @task(outlets=[silver_asset], map_index_template="{{ partition }}")
    def silver(partition: str, **context) -> str:
        from pipelines.jobs.failures import run_task
        from pipelines.jobs.lake import build_silver

        run_task(build_silver, partition, context["run_id"], dataset=name)
        return partition

    @task
    def plan_gold(partitions: list[str]) -> list[str]:
        from pipelines.jobs.failures import run_task
        from pipelines.jobs.lake import gold_targets

        return run_task(gold_targets, list(partitions), dataset=name)

    @task(map_index_template="{{ partition }}")
    def gold(partition: str, **context) -> dict:
        from pipelines.jobs.failures import run_task
        from pipelines.jobs.lake import build_gold

        return run_task(build_gold, partition, context["run_id"], dataset=name).to_dict()

    @task(outlets=[gold_asset])
    def gold_published(reports: list[dict], **context) -> list[str]:
        # One Asset event per run, once every gold partition of the run is committed: an event per
        # mapped gold task would start training after the first, on a half-rebuilt gold layer.
        partitions = sorted(r["partition"] for r in reports)
        context["outlet_events"][gold_asset].extra = {"partitions": partitions, "dataset": name}
        return partitions

    return gold_published(gold.expand(partition=plan_gold(silver.expand(partition=partitions))))


def lakehouse_dag(ds: Dataset):
    name = ds.name
    bronze_asset = Asset(name=ds.asset_name("bronze"), uri=ds.asset_uri("bronze"))
    silver_asset = Asset(name=ds.asset_name("silver"), uri=ds.asset_uri("silver"))
    gold_asset = Asset(name=ds.asset_name("gold"), uri=ds.asset_uri("gold"))

    @dag(
        dag_id=ds.lakehouse_dag_id,
        schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # runs touching the same partitions are serialised
        default_args=default_args,
        tags=["lakehouse", "great-expectations", f"dataset:{name}"],
        doc_md=__doc__.format(
            dataset=name, contract=ds.contract_path.name, grain=ds.grain, training_dag=ds.training_dag_id
        ),
    )
    def lakehouse():
        @task(outlets=[bronze_asset])
        def bronze(**context) -> list[str]:
            from pipelines.jobs.failures import run_task
            from pipelines.jobs.lake import build_bronze, partition_from_context

            report = run_task(build_bronze, partition_from_context(context), context["run_id"], dataset=name)
            return sorted(report.partitions)

        @task
        def data_docs(partitions: list[str]) -> str:
            from pipelines.jobs.lake import publish_docs

            return publish_docs()

        data_docs(rebuild_silver_and_gold(name, bronze(), silver_asset, gold_asset))

    return lakehouse()


for _dataset in catalogue().values():
    globals()[_dataset.lakehouse_dag_id] = lakehouse_dag(_dataset)


STREAM_DOC = """
### Live path of dataset `{dataset}`: rebuild silver and gold for the partitions the stream touched

`platform stream --dataset {dataset}` commits MQTT readings to bronze in micro-batches and updates the
Asset `{asset}` (Airflow's REST API, at most once a minute) with the touched partitions in its extra.
Each update schedules a run of this DAG: silver and gold are rebuilt for exactly those partitions
(and the next one's gold, whose windows read them), with the same jobs and gates as
`{lakehouse_dag}`, and the gold Asset schedules `{training_dag}`. A manual run may name partitions in
its conf: `{{"partitions": ["YYYY-MM-DD"]}}`.
"""


def stream_rebuild_dag(ds: Dataset):
    name = ds.name
    stream_asset = Asset(name=f"{name}_bronze_stream", uri=ds.stream_asset_uri())
    silver_asset = Asset(name=ds.asset_name("silver"), uri=ds.asset_uri("silver"))
    gold_asset = Asset(name=ds.asset_name("gold"), uri=ds.asset_uri("gold"))

    @dag(
        dag_id=ds.stream_dag_id,
        schedule=[stream_asset],
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # two rebuilds of the same partitions never overlap
        default_args=default_args,
        tags=["lakehouse", "streaming", "great-expectations", f"dataset:{name}"],
        doc_md=STREAM_DOC.format(
            dataset=name,
            asset=stream_asset.uri,
            lakehouse_dag=ds.lakehouse_dag_id,
            training_dag=ds.training_dag_id,
        ),
    )
    def stream_rebuild():
        @task
        def touched(**context) -> list[str]:
            partitions: set[str] = set()
            for events in (context.get("triggering_asset_events") or {}).values():
                for event in events:
                    partitions.update((event.extra or {}).get("partitions", []))
            partitions.update(((context["dag_run"].conf or {}).get("partitions")) or [])
            if not partitions:
                print(f"[stream] {name}: the triggering events name no partition: nothing to rebuild")
            return sorted(partitions)

        rebuild_silver_and_gold(name, touched(), silver_asset, gold_asset)

    return stream_rebuild()


for _dataset in catalogue().values():
    globals()[_dataset.stream_dag_id] = stream_rebuild_dag(_dataset)
