"""
### IoT anomaly detector: train (and evaluate) → register → offline gate

Scheduled by the **gold Asset**: every publish of a gold partition by `iot_lakehouse`
queues a run. It trains the candidate model families on all published gold partitions
(held-out later time range for evaluation), logs everything to MLflow (params, metrics,
model with signature, plots, the datasets with digests, lineage tags), registers a new
version of `iot-anomaly-detector` and runs the offline gate. Evaluation on the held-out later time
range runs inside `train` on purpose: its metrics, plots and datasets belong to the same MLflow run
as the model, which a separate task could only reopen.

The gate:

* the first version becomes `champion`;
* later versions are scored against the champion on the same evaluation set and get the
  `challenger` alias only if they are not worse on the primary metric by more than the
  configured margin and pass the guardrails (see `params.yaml`, section `registry`).

Logic lives in `pipelines.jobs.model`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

GOLD = Asset(name="iot_telemetry_gold", uri="s3://lake/gold/iot_telemetry")

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
}


@dag(
    dag_id="iot_training",
    schedule=[GOLD],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["iot", "training", "mlflow"],
    doc_md=__doc__,
)
def iot_training():
    @task
    def train(**context) -> dict:
        from pipelines.jobs.model import train as train_model

        conf = context["dag_run"].conf or {}
        return train_model(conf.get("partitions"), dag_id=context["dag"].dag_id, run_id=context["run_id"])

    @task
    def register(trained: dict) -> dict:
        from pipelines.jobs.model import register as register_version

        return register_version(trained)

    @task
    def gate(registered: dict) -> dict:
        from pipelines.jobs.model import gate as offline_gate

        return offline_gate(registered)

    gate(register(train()))


iot_training()
