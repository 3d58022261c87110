"""End to end through real Airflow DAG runs: landing → bronze → silver → gold → MLflow model + alias."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pipelines import storage

DATES = ["2026-01-05", "2026-01-06", "2026-01-07"]


@pytest.fixture(scope="module")
def pipeline_run(stack, store, settings):
    """Land three simulated days and run the real DAGs for them, as `platform demo` does."""
    from pipelines.jobs.lake import land_simulated_days
    from pipelines.orchestration import LAKEHOUSE_DAG, TRAINING_DAG, DagRunRequest, logical_date_for_partition, run_dags

    land_simulated_days(dt.date.fromisoformat(DATES[0]), len(DATES), store=store)
    runs = [DagRunRequest(LAKEHOUSE_DAG, logical_date_for_partition(d)) for d in DATES]
    return run_dags(runs + [DagRunRequest(TRAINING_DAG)], check=False)


def test_every_dag_run_succeeded(pipeline_run):
    assert len(pipeline_run) == len(DATES) + 1, pipeline_run  # a failed run ends the batch
    assert all(r.succeeded for r in pipeline_run), [r.log_file for r in pipeline_run if not r.succeeded]
    assert all(Path(r.log_file).read_text().count("DagRun Finished") == 1 for r in pipeline_run)  # own log each


def test_each_layer_has_a_published_partition_per_date(pipeline_run, store, settings):
    for layer in ("bronze", "silver", "gold", "quarantine"):
        assert storage.list_partitions(store, layer, settings.dataset) == DATES, layer
    landed = store.list_keys(settings.landing_bucket, f"{settings.dataset}/")
    assert len(landed) == len(DATES)


def test_row_counts_are_consistent_across_layers(pipeline_run, store, settings):
    from pipelines.settings import load_params

    p = load_params()["simulate"]
    per_day = p["devices"] * 86400 // p["freq_seconds"]
    for d in DATES:
        bronze = storage.read_manifest(store, "bronze", settings.dataset, d).rows
        silver = storage.read_manifest(store, "silver", settings.dataset, d).rows
        quarantine = storage.read_manifest(store, "quarantine", settings.dataset, d).rows
        gold = storage.read_manifest(store, "gold", settings.dataset, d).rows
        assert bronze > 0.9 * per_day, (d, bronze, per_day)  # dropouts may remove a few readings
        assert silver + quarantine <= bronze and silver > 0.9 * bronze
        assert gold == silver


def test_quality_results_are_stored_and_passed(pipeline_run, store, settings):
    for layer in ("bronze", "silver", "gold"):
        for d in DATES:
            key = f"quality/{layer}/{settings.dataset}/event_date={d}/validation.json"
            result = json.loads(store.get_bytes(settings.lake_bucket, key))
            assert result["success"] is True, (layer, d, result.get("outcomes"))
            assert result["statistics"]["evaluated_expectations"] >= 3


def test_rerunning_a_date_is_idempotent(pipeline_run, store, settings):
    from pipelines.orchestration import LAKEHOUSE_DAG, logical_date_for_partition, run_dag

    before = {
        layer: storage.read_manifest(store, layer, settings.dataset, DATES[1]) for layer in ("bronze", "silver", "gold")
    }
    run_dag(LAKEHOUSE_DAG, logical_date_for_partition(DATES[1]))
    for layer, m in before.items():
        after = storage.read_manifest(store, layer, settings.dataset, DATES[1])
        assert after.run_id != m.run_id, "the re-run must have rewritten the partition"
        assert after.rows == m.rows
        if layer != "bronze":  # bronze carries the ingestion run id and time as lineage
            assert after.content_sha256 == m.content_sha256, layer


def test_model_is_registered_with_alias_and_artifacts_in_object_store(pipeline_run, settings, store):
    from mlflow import MlflowClient
    from pipelines.datasets import get_dataset

    client = MlflowClient(settings.mlflow_tracking_uri)
    name = get_dataset("iot_telemetry").model_name
    model = client.get_registered_model(name)
    assert model.aliases.get("champion") == "1"
    version = client.get_model_version(name, "1")
    run = client.get_run(version.run_id)
    for metric in ("precision", "recall", "f1", "pr_auc", "baseline_threshold_f1"):
        assert metric in run.data.metrics, metric
    assert 0.0 <= run.data.metrics["pr_auc"] <= 1.0
    # The run names the exact data it was trained on.
    snapshot = json.loads(run.data.tags["gold_snapshot"])
    assert set(snapshot["partitions"]) == set(DATES)
    assert run.data.tags.get("airflow_dag_id") == "iot_training"
    # Artifacts are proxied by the MLflow server into the object store's MLflow bucket.
    artifact_keys = store.list_keys(settings.mlflow_bucket, "artifacts/")
    assert any(k.endswith("MLmodel") for k in artifact_keys)
    assert any(k.endswith(".png") for k in artifact_keys)


def test_cli_status_json_lists_every_endpoint(stack):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["endpoints"]) == {"s3", "mlflow", "airflow"}
    assert info["services"]["object-store"]["running"] and info["services"]["mlflow"]["healthy"]


def test_canary_dag_runs_through_airflow_and_shows_its_stage_as_the_run_note(pipeline_run, settings):
    """The canary DAG is wired for real, and its step outcome is the run's note in the Airflow UI
    (set by plugins/canary_run_notes.py from the `evaluate` task's `note`)."""
    import json
    import sqlite3

    from pipelines.orchestration import run_dag

    result = run_dag("iot_canary")
    assert result.succeeded
    db = settings.airflow_sql_alchemy_conn.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        run_id, note = conn.execute(
            "SELECT r.run_id, n.content FROM dag_run r LEFT JOIN dag_run_note n ON n.dag_run_id = r.id "
            "WHERE r.dag_id = 'iot_canary' ORDER BY r.id DESC LIMIT 1"
        ).fetchone()
        (stage,) = conn.execute(
            "SELECT value FROM xcom WHERE dag_id = 'iot_canary' AND run_id = ? AND task_id = 'evaluate' "
            "AND key = 'note'",
            (run_id,),
        ).fetchone()
    stage = json.loads(stage)
    assert stage, "evaluate must describe the stage"
    assert note == stage[:1000], (note, stage)


def test_data_docs_are_published_to_the_object_store(pipeline_run, store, settings):
    """GX Data Docs for every stored validation, as a static site in the lake (open it locally with
    `python -m pipelines.quality.docs --open`)."""
    keys = store.list_keys(settings.lake_bucket, "data-docs/")
    assert "data-docs/index.html" in keys
    index = store.get_bytes(settings.lake_bucket, "data-docs/index.html").decode()
    assert "iot_telemetry" in index and len([k for k in keys if k.endswith(".html")]) > len(DATES)


def test_a_failed_run_ends_the_batch_and_names_its_log(pipeline_run, settings):
    """`platform run` runs its DAG runs in one process: the first failure stops it (training must not
    run after a lakehouse day failed) and the error points at that run's own log."""
    from pipelines.orchestration import TRAINING_DAG, DagRunFailed, DagRunRequest, run_dags

    log_dir = settings.state_dir / "logs" / "dag-runs"
    before = set(log_dir.iterdir())
    with pytest.raises(DagRunFailed, match=r"no_such_dag failed \(2031-01-02\)") as err:
        run_dags([DagRunRequest("no_such_dag", "2031-01-02"), DagRunRequest(TRAINING_DAG)], progress=lambda _: None)
    new_logs = set(log_dir.iterdir()) - before
    assert len(new_logs) == 1 and TRAINING_DAG not in next(iter(new_logs)).name, new_logs
    assert str(next(iter(new_logs))) in str(err.value)
    assert "could not be found" in next(iter(new_logs)).read_text()
