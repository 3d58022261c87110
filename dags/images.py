"""
### Image dataset `{dataset}`: landing → bronze → silver → gold, one delivery per run

Declared for every image contract (`pipelines/images/contracts/*.yaml`, or `images/` in
`PLATFORM_CONTRACTS_DIR`). Contract `{contract}`: images resized to **{width} x {height}** RGB.
Land a delivery with `platform land --images DIR --dataset {dataset} --date YYYY-MM-DD` (a folder or
zip, one sub-folder per class), then trigger this DAG with `{{"delivery_date": "YYYY-MM-DD"}}`.

| task | reads | writes | gate |
| --- | --- | --- | --- |
| `bronze` | `s3://landing/{dataset}/<delivery>/*.zip` | `lake/bronze/{dataset}/event_date=<delivery>/`: image bytes, class, lineage; one row per content hash (duplicates counted) | |
| `silver` | bronze partition | decoded, EXIF-oriented, RGB, resized pixels; bad files → `lake/quarantine/...` with rule and reason | GX: dimensions, channels, pixel bytes, unique hashes, classes, class balance |
| `gold` | silver partition | pixels, 64-bin colour histogram, train/test split by content hash | GX: split, histograms, pixel bytes |

The gold Asset schedules `{training_dag}`. Logic lives in `pipelines.images.lake`; this file only wires tasks.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, dag, task

from pipelines.images.contract import ImageContract, image_catalogue

default_args = {
    "owner": "data-platform",
    "retries": 3,  # I/O only: pipelines.jobs.failures.run_task fails deterministic errors at once
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
}

TRAINING_DOC = """
### Image classifier of `{dataset}`: train → register → offline gate

Scheduled by the gold Asset `{gold_asset}`. Fits IncrementalPCA on gold's training split inside the
MLflow run (bounded memory), a classifier on top, and the colour-histogram nearest-centroid baseline
on the same split; logs params, accuracy and macro F1 beside the baseline, the confusion matrix,
the gold snapshot and GX results, and the model (PCA inside the logged Pipeline, skops). Registers a
version of **`{model_name}`**; the offline gate scores it and the champion on the same test split
(accuracy, margin and guardrails from `params.yaml` `registry`): the first version becomes
`champion`, a later one `challenger`. `POST /classify` serves it (PLATFORM_SERVING_IMAGE_MODEL).
Logic lives in `pipelines.images.model`; this file only wires tasks.
"""


def image_dag_ids(name: str) -> tuple[str, str]:
    return f"{name}_images", f"{name}_image_training"


def image_lake_dag(contract: ImageContract):
    name = contract.name
    lake_id, training_id = image_dag_ids(name)
    gold_asset = Asset(name=f"{name}_gold", uri=f"s3://lake/gold/{name}")

    @dag(
        dag_id=lake_id,
        schedule=None,  # deliveries arrive when someone lands them: triggered with conf delivery_date
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=default_args,
        tags=["lakehouse", "images", "great-expectations", f"dataset:{name}"],
        doc_md=__doc__.format(
            dataset=name,
            contract=f"{name}.yaml",
            width=contract.width,
            height=contract.height,
            training_dag=training_id,
        ),
    )
    def images():
        @task
        def bronze(**context) -> str:
            from pipelines.images.lake import build_image_bronze
            from pipelines.jobs.failures import run_task
            from pipelines.jobs.lake import partition_from_context

            delivery = partition_from_context(context)
            run_task(build_image_bronze, delivery, context["run_id"], dataset=name)
            return delivery

        @task
        def silver(delivery: str, **context) -> str:
            from pipelines.images.lake import build_image_silver
            from pipelines.jobs.failures import run_task

            run_task(build_image_silver, delivery, context["run_id"], dataset=name)
            return delivery

        @task(outlets=[gold_asset])
        def gold(delivery: str, **context) -> dict:
            from pipelines.images.lake import build_image_gold
            from pipelines.jobs.failures import run_task

            report = run_task(build_image_gold, delivery, context["run_id"], dataset=name)
            context["outlet_events"][gold_asset].extra = {"partitions": [delivery], "dataset": name}
            return report

        gold(silver(bronze()))

    return images()


def image_training_dag(contract: ImageContract):
    name = contract.name
    _, training_id = image_dag_ids(name)
    gold_asset = Asset(name=f"{name}_gold", uri=f"s3://lake/gold/{name}")

    @dag(
        dag_id=training_id,
        schedule=[gold_asset],
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={**default_args, "owner": "ml-platform", "retries": 2},
        tags=["training", "images", "mlflow", f"dataset:{name}"],
        doc_md=TRAINING_DOC.format(dataset=name, gold_asset=gold_asset.uri, model_name=contract.registered_model),
    )
    def image_training():
        @task
        def train(**context) -> dict:
            from pipelines.images.model import train_job
            from pipelines.jobs.failures import run_task

            conf = context["dag_run"].conf or {}
            return run_task(
                train_job, conf.get("partitions"), dataset=name, dag_id=context["dag"].dag_id, run_id=context["run_id"]
            )

        @task
        def register(trained: dict) -> dict:
            from pipelines.images.model import register_job
            from pipelines.jobs.failures import run_task

            return run_task(register_job, trained)

        @task
        def gate(registered: dict) -> dict:
            from pipelines.images.model import gate_job
            from pipelines.jobs.failures import run_task

            return run_task(gate_job, registered)

        gate(register(train()))

    return image_training()


for _contract in image_catalogue().values():
    _lake_id, _training_id = image_dag_ids(_contract.name)
    globals()[_lake_id] = image_lake_dag(_contract)
    globals()[_training_id] = image_training_dag(_contract)
