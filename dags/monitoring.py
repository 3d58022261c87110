"""
### Monitoring of `{model_name}` on dataset `{dataset}`: drift of each window, the alarm that retrains

Declared for every dataset of the catalogue. Hourly, each run judges the **window** of the last
`{window}` before its hour (`datasets.{dataset}.monitoring.window` in `params.yaml`; a manual run may
name `{{"window_end": "YYYY-MM-DDTHH:MM:SSZ"}}` in its conf):

* **judge** — the window's gold rows (the model's features) and prediction log (score, alert flag,
  errors, latency; where no prediction log covers the window, the version's own scores of the rows)
  against the reference profile logged with the model version that served them: per-feature effect
  sizes (normed Wasserstein, Jensen-Shannon), the score and the alert rate. Rule: {rule}.
  Where labels have arrived (`/feedback` on served records, else the gold rows' own labels), the
  window's precision, recall, F1, event recall and false alarms per 1,000 rows beside the drift.
  The report (JSON, HTML, figure) goes to `s3://lake/monitoring/{dataset}/window=<start>/` and to a
  run of the MLflow experiment `monitoring-{dataset}`.
* **raise_alarm** — only when a persistent drift raises a new alarm (skipped otherwise): updates the
  Asset `{drift_asset}` with the alarm in its extra. The Asset schedules `{training_dag}`, whose
  run is tagged with the alarm; its offline gate and `{canary_dag}` then decide as for any version.
  `platform monitor --dataset {dataset}` follows each alarm to its runs, versions and rollouts.

Logic lives in `pipelines.monitoring.loop`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from pipelines.datasets import Dataset, catalogue

default_args = {
    "owner": "ml-platform",
    "retries": 2,  # I/O only: pipelines.jobs.failures.run_task fails deterministic errors at once
    "retry_delay": timedelta(seconds=30),
}


def monitoring_dag(ds: Dataset):
    name = ds.name
    drift_asset = Asset(name=ds.asset_name("drift"), uri=ds.drift_asset_uri())
    rule = (
        f"a window drifts when >= {ds.params.monitoring.drift_share:.0%} of its features drift or one moves "
        f">= {ds.params.monitoring.strong_wasserstein:g} reference stds; alarm when {ds.params.monitoring.alarm_windows} "
        f"of the last {ds.params.monitoring.of_windows} windows drift"
    )

    @dag(
        dag_id=ds.monitoring_dag_id,
        schedule=CronDataIntervalTimetable("@hourly", timezone="UTC"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # windows are judged in order: the persistence rule reads the previous ones
        default_args=default_args,
        tags=["monitoring", "mlflow", f"dataset:{name}"],
        doc_md=__doc__.format(
            dataset=name,
            model_name=ds.model_name,
            window=ds.params.monitoring.window,
            rule=rule,
            drift_asset=drift_asset.uri,
            training_dag=ds.training_dag_id,
            canary_dag=ds.canary_dag_id,
        ),
    )
    def monitoring():
        @task
        def judge(**context) -> dict:
            from pipelines.jobs.failures import run_task
            from pipelines.monitoring.loop import monitor_window, window_end_from_context

            return run_task(
                monitor_window,
                window_end_from_context(context),
                dataset=name,
                dag_id=context["dag"].dag_id,
                run_id=context["run_id"],
            )

        @task(outlets=[drift_asset])
        def raise_alarm(judged: dict, **context) -> dict:
            from airflow.sdk.exceptions import AirflowSkipException

            if not judged.get("emit"):
                # skipped: a skipped task updates no Asset, so training is not scheduled
                raise AirflowSkipException(judged.get("note", "no new alarm"))
            context["outlet_events"][drift_asset].extra = judged["alarm"]
            return judged["alarm"]

        raise_alarm(judge())

    return monitoring()


for _dataset in catalogue().values():
    globals()[_dataset.monitoring_dag_id] = monitoring_dag(_dataset)
