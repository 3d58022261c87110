"""
### Anomaly detector of dataset `{dataset}`: train (and evaluate) → register → offline gate

Declared for every dataset of the catalogue. Scheduled by the dataset's **gold Asset**
(`{gold_asset}`) **or its drift Asset** (`{drift_asset}`): a lakehouse run that publishes gold, or a
persistent drift alarm of `{monitoring_dag}`, queues a run (a run started by an alarm tags its MLflow
run and the version it registers with `monitoring.alarm_id`, read from the Asset event). It trains the candidate
model families on the published gold partitions (held-out later time range for evaluation; labels
from the data or from the contract's windows file, for evaluation), logs everything to MLflow
(params, metrics, event-level scores where windows are known, the model with its signature, plots,
the datasets with digests, lineage tags), registers a new version of **`{model_name}`** (this
dataset's own model: models of two datasets are never compared) and runs the offline gate:

* the first version becomes `champion`;
* later versions are scored against the champion on the same evaluation set and get the
  `challenger` alias only if they are not worse on the primary metric by more than the
  configured margin and pass the guardrails (see `params.yaml`, section `registry`).

Deterministic failures fail at once (no retries, no orphan MLflow runs); only I/O retries.
Logic lives in `pipelines.jobs.model`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from pipelines.datasets import Dataset, catalogue

default_args = {
    "owner": "ml-platform",
    "retries": 2,  # I/O only: pipelines.jobs.failures.run_task fails deterministic errors at once
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
}


def training_dag(ds: Dataset):
    name = ds.name
    gold_asset = Asset(name=ds.asset_name("gold"), uri=ds.asset_uri("gold"))
    drift_asset = Asset(name=ds.asset_name("drift"), uri=ds.drift_asset_uri())

    @dag(
        dag_id=ds.training_dag_id,
        schedule=(gold_asset | drift_asset),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=default_args,
        tags=["training", "mlflow", f"dataset:{name}"],
        doc_md=__doc__.format(
            dataset=name,
            gold_asset=gold_asset.uri,
            drift_asset=drift_asset.uri,
            monitoring_dag=ds.monitoring_dag_id,
            model_name=ds.model_name,
        ),
    )
    def training():
        @task
        def train(**context) -> dict:
            from pipelines.jobs.failures import run_task
            from pipelines.jobs.model import train as train_model
            from pipelines.monitoring.loop import alarms_from_events, record_retraining

            conf = context["dag_run"].conf or {}
            alarms = alarms_from_events(context.get("triggering_asset_events"))
            trained = run_task(
                train_model,
                conf.get("partitions"),
                dataset=name,
                dag_id=context["dag"].dag_id,
                run_id=context["run_id"],
            )
            run_task(record_retraining, alarms, trained)  # which drift alarm started this run
            return {**trained, "drift_alarms": alarms}

        @task
        def register(trained: dict) -> dict:
            from pipelines.jobs.failures import run_task
            from pipelines.jobs.model import register as register_version
            from pipelines.monitoring.loop import record_version

            registered = run_task(register_version, trained)
            run_task(record_version, trained.get("drift_alarms") or [], registered)
            return registered

        @task
        def gate(registered: dict) -> dict:
            from pipelines.jobs.failures import run_task
            from pipelines.jobs.model import gate as offline_gate

            return run_task(offline_gate, registered)

        gate(register(train()))

    return training()


for _dataset in catalogue().values():
    globals()[_dataset.training_dag_id] = training_dag(_dataset)
