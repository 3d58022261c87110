"""Model jobs: train on gold, register a version, run the offline gate; shared by DAG tasks and the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipelines.settings import get_settings, load_params

Progress = Callable[[str], None]


def train(
    partitions: list[str] | None = None,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    from pipelines import lineage
    from pipelines.jobs.lake import read_gold, read_quality
    from pipelines.training import TrainingContext, train_and_log

    settings = get_settings()
    gold, snapshot = read_gold(partitions)
    progress(f"[train] {len(gold)} gold rows from partitions {', '.join(snapshot['partitions'])}")
    quality = read_quality("gold", list(snapshot["partitions"]))
    context = TrainingContext(
        data_snapshot=snapshot,
        git_commit=lineage.git_commit(),
        dvc_lock_digest=lineage.dvc_lock_digest(),
        gx_summary=quality or None,
        airflow_dag_id=dag_id,
        airflow_run_id=run_id,
        dataset_name=snapshot["dataset"],
    )
    result = train_and_log(
        gold,
        load_params(),
        context,
        tracking_uri=settings.mlflow_tracking_uri,
        experiment=settings.mlflow_experiment,
        progress=progress,
    )
    # Plain JSON for XCom: the next task rebuilds the TrainResult from it.
    return {**dataclasses.asdict(result), "partitions": list(snapshot["partitions"])}


def register(trained: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    """A new version of the use case's registered model, from a training run."""
    from pipelines import registry
    from pipelines.training import TrainResult

    settings = get_settings()
    model_name = load_params()["registry"]["model_name"]
    fields = {f.name for f in dataclasses.fields(TrainResult)}
    result = TrainResult(**{k: v for k, v in trained.items() if k in fields})
    version = registry.register_version(result, model_name, tracking_uri=settings.mlflow_tracking_uri)
    progress(f"[register] {model_name} version {version.version} from run {result.run_id}")
    return {"model_name": model_name, "version": str(version.version), "partitions": trained["partitions"]}


def gate(registered: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    """The offline gate: challenger vs champion on the same held-out set; sets aliases if it passes."""
    from pipelines import registry
    from pipelines.jobs.lake import read_gold
    from pipelines.training import split_by_time

    settings = get_settings()
    params = load_params()
    model_name, version = registered["model_name"], registered["version"]
    gold, _ = read_gold(registered["partitions"])
    _, eval_df = split_by_time(gold, params["train"]["test_fraction"])
    decision = registry.offline_gate(model_name, version, eval_df, params, tracking_uri=settings.mlflow_tracking_uri)
    progress(f"[gate] passed={decision.passed}: {decision.reason}")
    return {
        "model_name": model_name,
        "version": version,
        "gate_passed": decision.passed,
        "gate_reason": decision.reason,
        "aliases": registry.describe_aliases(model_name, tracking_uri=settings.mlflow_tracking_uri),
    }


def register_and_gate(trained: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    return gate(register(trained, progress=progress), progress=progress)
