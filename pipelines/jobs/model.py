"""Model jobs: train on gold, register a version, run the offline gate; shared by DAG tasks and the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipelines.settings import get_settings

Progress = Callable[[str], None]


def _dataset(dataset: str | None) -> str:
    return dataset or get_settings().dataset


def train(
    partitions: list[str] | None = None,
    *,
    dataset: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    from pipelines import lineage
    from pipelines.datasets import effective_params
    from pipelines.jobs.lake import read_gold, read_quality
    from pipelines.training import TrainingContext, train_and_log

    settings = get_settings()
    dataset = _dataset(dataset)
    params = effective_params(dataset)
    gold, snapshot = read_gold(partitions, dataset=dataset)
    parts = list(snapshot["partitions"])
    span = parts[0] if len(parts) == 1 else f"{parts[0]} .. {parts[-1]}"
    progress(f"[train] {dataset}: {len(gold)} gold rows from {len(parts)} partition(s) {span}")
    gold, windows = _with_label_windows(gold, dataset, progress)
    quality = read_quality("gold", parts, dataset=dataset)
    context = TrainingContext(
        data_snapshot=snapshot,
        git_commit=lineage.git_commit(),
        dvc_lock_digest=lineage.dvc_lock_digest(),
        gx_summary=quality or None,
        airflow_dag_id=dag_id,
        airflow_run_id=run_id,
        dataset_name=snapshot["dataset"],
        label_windows=windows,
    )
    result = train_and_log(
        gold,
        params,
        context,
        tracking_uri=settings.mlflow_tracking_uri,
        experiment=settings.mlflow_experiment,
        progress=progress,
    )
    # Plain JSON for XCom: the next task rebuilds the TrainResult from it.
    return {**dataclasses.asdict(result), "partitions": parts, "dataset": dataset}


def _with_label_windows(gold, dataset: str, progress: Progress):
    """Labels from the contract's windows file (evaluation only), where the data has none."""
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.training import label_from_windows

    contract = load_contract(get_dataset(dataset).contract_path)
    if contract.label_windows is None:
        return gold, None
    windows = contract.label_windows.load()
    if gold["is_anomaly"].notna().any():
        progress(f"[train] {dataset}: the data carries labels; windows file used for event-level scores only")
        return gold, windows
    progress(f"[train] {dataset}: labels from {len(windows)} window(s) in {contract.label_windows.file}")
    return label_from_windows(gold, windows), windows


def register(trained: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    """A new version of the use case's registered model, from a training run."""
    from pipelines import registry
    from pipelines.datasets import get_dataset
    from pipelines.training import TrainResult

    settings = get_settings()
    dataset = _dataset(trained.get("dataset"))
    model_name = get_dataset(dataset).model_name
    fields = {f.name for f in dataclasses.fields(TrainResult)}
    result = TrainResult(**{k: v for k, v in trained.items() if k in fields})
    version = registry.register_version(result, model_name, tracking_uri=settings.mlflow_tracking_uri)
    progress(f"[register] {model_name} version {version.version} from run {result.run_id}")
    return {
        "model_name": model_name,
        "version": str(version.version),
        "partitions": trained["partitions"],
        "dataset": dataset,
    }


def gate(registered: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    """The offline gate: challenger vs champion on the same held-out set; sets aliases if it passes."""
    from pipelines import registry
    from pipelines.datasets import effective_params
    from pipelines.jobs.lake import read_gold
    from pipelines.training import split_by_time

    settings = get_settings()
    dataset = _dataset(registered.get("dataset"))
    params = effective_params(dataset)
    model_name, version = registered["model_name"], registered["version"]
    gold, _ = read_gold(registered["partitions"], dataset=dataset)
    gold, windows = _with_label_windows(gold, dataset, progress)
    _, eval_df = split_by_time(gold, params["train"]["test_fraction"])
    decision = registry.offline_gate(
        model_name, version, eval_df, params, tracking_uri=settings.mlflow_tracking_uri, windows=windows
    )
    progress(f"[gate] passed={decision.passed}: {decision.reason}")
    return {
        "model_name": model_name,
        "dataset": dataset,
        "version": version,
        "gate_passed": decision.passed,
        "gate_reason": decision.reason,
        "aliases": registry.describe_aliases(model_name, tracking_uri=settings.mlflow_tracking_uri),
    }


def register_and_gate(trained: dict[str, Any], *, progress: Progress = print) -> dict[str, Any]:
    return gate(register(trained, progress=progress), progress=progress)
