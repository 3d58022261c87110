"""
### IoT lakehouse: landing → bronze → silver → gold, one delivery date per run

Each run owns one **delivery date**: its data interval's start (a manual run may pass
`{"partition_date": "YYYY-MM-DD"}` as conf). Records are filed by their **event date**, so a
delivery can touch several partitions (late data); silver and gold are then rebuilt for exactly
those partitions, in parallel (dynamic task mapping).

| task | reads | writes | gate |
| --- | --- | --- | --- |
| `bronze` | `s3://landing/<dataset>/<delivery date>/*` as delivered | `lake/bronze/.../event_date=<d>/` Parquet + lineage, one batch per delivery | GX bronze suite (structure, row count vs source) |
| `silver` (mapped) | bronze partition (all deliveries) | `lake/silver/...` typed, deduplicated; bad records → `lake/quarantine/...` with the rule broken | GX silver suite (types, keys, ranges, no future) |
| `plan_gold` | touched partitions | the gold partitions to rebuild (touched + the next day, whose windows read them) | |
| `gold` (mapped) | silver partition (+ previous day as warm-up) | `lake/gold/...` model features | GX gold suite (no NaN/inf, drift bounds) |
| `gold_published` | the gold reports | the gold Asset event (its extra names the partitions): schedules `iot_training` once the whole run's gold is committed | |
| `data_docs` | every stored GX validation | `lake/data-docs/` (the Data Docs site, rebuilt once per run) | |

Every partition is published atomically through a `_manifest.json` commit object; re-running a
date replaces exactly its records (idempotent). A critical quality failure fails the task before
anything is published and stops everything downstream; GX results are stored under
`lake/quality/`. Updating the gold Asset (once per run, after all its gold partitions) schedules
`iot_training`.

**Backfill** (reprocess history on request): Airflow UI → *Trigger* → *Backfill*, or
`airflow backfill create --dag-id iot_lakehouse --from-date 2026-01-05 --to-date 2026-01-08`,
or without a scheduler `platform backfill 2026-01-05 2026-01-07`.

Logic lives in `pipelines.jobs.lake`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

BRONZE = Asset(name="iot_telemetry_bronze", uri="s3://lake/bronze/iot_telemetry")
SILVER = Asset(name="iot_telemetry_silver", uri="s3://lake/silver/iot_telemetry")
GOLD = Asset(name="iot_telemetry_gold", uri="s3://lake/gold/iot_telemetry")

default_args = {
    "owner": "data-platform",
    "retries": 3,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,  # object-store hiccups heal; bad data fails the same way each try
    "max_retry_delay": timedelta(minutes=5),
}


@dag(
    dag_id="iot_lakehouse",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs touching the same partitions are serialised
    default_args=default_args,
    tags=["iot", "lakehouse", "great-expectations"],
    doc_md=__doc__,
)
def iot_lakehouse():
    @task(outlets=[BRONZE])
    def bronze(**context) -> list[str]:
        from pipelines.jobs.lake import build_bronze, partition_from_context

        report = build_bronze(partition_from_context(context), context["run_id"])
        return sorted(report.partitions)

    @task(outlets=[SILVER], map_index_template="{{ partition }}")
    def silver(partition: str, **context) -> str:
        from pipelines.jobs.lake import build_silver

        build_silver(partition, context["run_id"])
        return partition

    @task
    def plan_gold(partitions: list[str]) -> list[str]:
        from pipelines.jobs.lake import gold_targets

        return gold_targets(list(partitions))

    @task(map_index_template="{{ partition }}")
    def gold(partition: str, **context) -> dict:
        from pipelines.jobs.lake import build_gold

        return build_gold(partition, context["run_id"]).to_dict()

    @task(outlets=[GOLD])
    def gold_published(reports: list[dict], **context) -> list[str]:
        # One Asset event per run, once every gold partition of the run is committed: an event per
        # mapped gold task would start training after the first, on a half-rebuilt gold layer.
        partitions = sorted(r["partition"] for r in reports)
        context["outlet_events"][GOLD].extra = {"partitions": partitions}
        return partitions

    @task
    def data_docs(partitions: list[str]) -> str:
        from pipelines.jobs.lake import publish_docs

        return publish_docs()

    data_docs(gold_published(gold.expand(partition=plan_gold(silver.expand(partition=bronze())))))


iot_lakehouse()
