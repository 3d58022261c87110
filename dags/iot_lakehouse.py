"""
### IoT lakehouse: landing → bronze → silver → gold, one event date per run

Each run owns one **event-date partition**: its data interval's start date (a run
triggered by hand may pass `{"partition_date": "YYYY-MM-DD"}` as conf instead).

| task | reads | writes | gate |
| --- | --- | --- | --- |
| `bronze` | `s3://landing/<dataset>/<date>/*` as delivered | `lake/bronze/...` Parquet + lineage columns | GX bronze suite (structure, row counts) |
| `silver` | bronze partition | `lake/silver/...` typed, deduplicated; bad records → `lake/quarantine/...` with the rule broken | GX silver suite (types, keys, ranges, no future) |
| `gold` | silver partition (+ previous day as warm-up) | `lake/gold/...` model features | GX gold suite (no NaN/inf, drift bounds) |

Every layer is published atomically through a `_manifest.json` commit object; re-running a
date replaces exactly that partition. A critical quality failure fails the task before the
partition is published and stops everything downstream; GX results are stored under
`lake/quality/`. Updating the gold Asset schedules `iot_training`.

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
    max_active_runs=4,
    default_args=default_args,
    tags=["iot", "lakehouse", "great-expectations"],
    doc_md=__doc__,
)
def iot_lakehouse():
    @task(outlets=[BRONZE])
    def bronze(**context) -> dict:
        from pipelines.jobs.lake import build_bronze, partition_from_context

        return build_bronze(partition_from_context(context), context["run_id"]).to_dict()

    @task(outlets=[SILVER])
    def silver(bronze_report: dict, **context) -> dict:
        from pipelines.jobs.lake import build_silver

        return build_silver(bronze_report["partition"], context["run_id"]).to_dict()

    @task(outlets=[GOLD])
    def gold(silver_report: dict, **context) -> dict:
        from pipelines.jobs.lake import build_gold

        return build_gold(silver_report["partition"], context["run_id"]).to_dict()

    gold(silver(bronze()))


iot_lakehouse()
