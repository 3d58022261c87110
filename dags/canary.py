"""
### Canary rollout of `{model_name}` (dataset `{dataset}`): its `challenger` against its `champion`

Declared for every dataset of the catalogue, and for every image contract (`<name>_image_canary`:
the classifier served by `/classify`, judged on its log by class agreement, confidence shift, error
rate, latency and accuracy on labels): each model rolls out on its own. One run
evaluates **one step** of the rollout (steps as data in `params.yaml`, section `canary`:
shadow → 10% → 50% → 100%):

* **start** — if no rollout of this model is running and the registry has a `challenger`, start one;
* **evaluate** — after the step's minimum requests and bake time, compare challenger and champion
  from the prediction log in the lake, on the same records (every step shadows the other model on
  the challenger's traffic): error rate, p99 latency, score rank correlation, flag rate, agreement,
  F1 on feedback labels; tests and thresholds in `pipelines.canary.analysis`:
  *Pass* → next step (at 100%: `champion` ← challenger, `previous` ← old champion),
  *Inconclusive* → hold, *Fail* → weight 0, version tagged with the reason.

The rollout state lives in `s3://lake/serving/rollouts/{model_name}.json` (the scoring service reads
it too); the current stage is the **run's note** in the Airflow UI (the `canary_run_notes` plugin
copies the `evaluate` task's `note` when the run ends), in the task log, and in
`platform canary status`.
Logic lives in `pipelines.canary.controller`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from pipelines.datasets import catalogue
from pipelines.images.contract import image_catalogue

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
}


def canary_dag(name: str, model_name: str, dag_id: str):
    @dag(
        dag_id=dag_id,
        schedule=timedelta(minutes=10),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=default_args,
        tags=["serving", "canary", "mlflow", f"dataset:{name}"],
        doc_md=__doc__.format(model_name=model_name, dataset=name),
    )
    def canary():
        @task
        def start_if_ready(**context) -> str:
            from pipelines.canary import controller

            actor = f"airflow:{context['dag'].dag_id}/{context['run_id']}"
            state = controller.status(dataset=name)["state"]
            if state.get("status") == "running":
                return f"rollout {state.get('rollout_id')} running at {state.get('step_name')}"
            try:
                state = controller.start_rollout(actor=actor, dataset=name)
            except ValueError as exc:  # no challenger, or it is already champion: nothing to do
                print(f"[canary] {name}: no rollout started: {exc}")
                return f"no rollout: {exc}"
            return controller.stage_note(state)

        @task
        def evaluate(started: str, **context) -> dict:
            from pipelines.canary import controller

            return controller.evaluate_step(actor=f"airflow:{context['dag'].dag_id}/{context['run_id']}", dataset=name)

        evaluate(start_if_ready())

    return canary()


def image_canary_dag_id(name: str) -> str:
    return f"{name}_image_canary"


for _dataset in catalogue().values():
    globals()[_dataset.canary_dag_id] = canary_dag(_dataset.name, _dataset.model_name, _dataset.canary_dag_id)
for _contract in image_catalogue().values():
    _dag_id = image_canary_dag_id(_contract.name)
    globals()[_dag_id] = canary_dag(_contract.name, _contract.registered_model, _dag_id)
