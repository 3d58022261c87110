"""
### IoT anomaly detector: canary rollout of the `challenger`

One run evaluates **one step** of the rollout of the `challenger` version against the `champion`
(steps as data in `params.yaml`, section `canary`: shadow → 10% → 50% → 100%):

* **start** — if no rollout is running and the registry has a `challenger`, start one at the first step;
* **evaluate** — after the step's minimum requests and bake time, compare challenger and champion
  from the prediction log in the lake, on the same records (every step shadows the other model on
  the challenger's traffic): error rate, p99 latency, score rank correlation, flag rate, agreement,
  F1 on feedback labels; tests and thresholds in `pipelines.canary.analysis`:
  *Pass* → next step (at 100%: `champion` ← challenger, `previous` ← old champion),
  *Inconclusive* → hold, *Fail* → weight 0, version tagged with the reason.

The rollout state lives in `s3://lake/serving/rollout.json` (the scoring service reads it too);
the current stage is the **run's note** in the Airflow UI (task code can't write notes in Airflow
3, so the `canary_run_notes` plugin copies the `evaluate` task's `note` when the run ends), in the
task log, and in `platform canary status`.
Logic lives in `pipelines.canary.controller`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
}


@dag(
    dag_id="iot_canary",
    schedule=timedelta(minutes=10),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["iot", "serving", "canary", "mlflow"],
    doc_md=__doc__,
)
def iot_canary():
    @task
    def start_if_ready(**context) -> str:
        from pipelines.canary import controller
        from pipelines.canary.state import read_state
        from pipelines.serving.predlog import lake_store
        from pipelines.settings import get_settings

        state = read_state(lake_store(get_settings(), 30.0))
        if state.active:
            return controller.stage_note(state)
        try:
            state = controller.start_rollout(actor=f"airflow:{context['dag'].dag_id}/{context['run_id']}")
        except ValueError as exc:  # no challenger, or it is already champion: nothing to do
            print(f"[canary] no rollout started: {exc}")
            return f"no rollout: {exc}"
        return controller.stage_note(state)

    @task
    def evaluate(started: str, **context) -> dict:
        from pipelines.canary import controller

        result = controller.evaluate_step(actor=f"airflow:{context['dag'].dag_id}/{context['run_id']}")
        return result

    evaluate(start_if_ready())


iot_canary()
