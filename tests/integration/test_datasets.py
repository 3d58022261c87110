"""A new dataset by its contract alone: real NAB files, a contract in a temporary folder, no code change.

Each file is landed whole as one delivery through the CLI, as a user does, and run through the real
DAGs (`airflow dags test`): its own DAGs, its own registered model and aliases, event-level scores
from the windows file the contract names, and nothing of the other dataset touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "datasets" / "nab" / "corpus"
FILES = {
    # 5-minute CPU percent of an RDS instance (two labelled windows, both in the held-out later range),
    # and an artificial daily series
    "ec2_cpu": "realAWSCloudwatch/rds_cpu_utilization_cc0c53.csv",
    "art_jumps": "artificialWithAnomaly/art_daily_jumpsup.csv",
}


def _contract(name: str, key: str) -> dict:
    return {
        "name": name,
        "description": f"NAB {key}, written from the corpus README by a new user",
        "cadence": "5min",
        "event_time": {"source": "timestamp", "source_format": "%Y-%m-%d %H:%M:%S", "timezone": "UTC"},
        "entity": {"constant": name},
        "columns": [{"name": "value", "source": "value", "type": "float64", "required": True}],
        "label_windows": {"file": str(CORPUS / "labels" / "combined_windows.json"), "key": key},
    }


@pytest.fixture(scope="module")
def user_datasets(tmp_path_factory, stack):
    if not CORPUS.exists():
        pytest.fail(f"The shared NAB corpus is missing: expected {CORPUS}")
    folder = tmp_path_factory.mktemp("contracts")
    for name, key in FILES.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_contract(name, key), sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"].update({name: {"grain": "month"} for name in FILES})
    # the second dataset's gate judges by NAB's event-level score instead of PR-AUC
    params["datasets"]["art_jumps"]["registry"] = {"primary_metric": "nab_standard"}
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLATFORM_CONTRACTS_DIR", str(folder))
        mp.setenv("PLATFORM_PARAMS_FILE", str(params_file))
        yield folder


def _cli(*argv: str) -> int:
    from pipelines.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def ec2_run(user_datasets):
    assert (
        _cli("land", "--file", str(CORPUS / "data" / FILES["ec2_cpu"]), "--dataset", "ec2_cpu", "--date", "2026-02-01")
        == 0
    )
    assert _cli("run", "--dataset", "ec2_cpu") == 0
    return "ec2_cpu"


def test_land_refuses_bad_arguments_before_landing(user_datasets, store, capsys):
    csv = str(CORPUS / "data" / FILES["ec2_cpu"])
    assert _cli("land", "--file", csv, "--dataset", "no_such_dataset") == 2
    assert "unknown dataset 'no_such_dataset'" in capsys.readouterr().err
    assert _cli("land", "--file", csv, "--dataset", "ec2_cpu", "--date", "2026-13-45") == 2
    assert "not a date" in capsys.readouterr().err
    assert not store.list_keys(store.settings.landing_bucket, "no_such_dataset/")


def test_a_whole_file_is_one_delivery_in_a_few_partitions(ec2_run, store):
    from pipelines import storage

    bronze = storage.list_partitions(store, "bronze", "ec2_cpu")
    gold = storage.list_partitions(store, "gold", "ec2_cpu")
    # 14 days of 5-minute readings in February 2014, long before the DAG's start_date: one monthly partition
    assert bronze == gold == ["2014-02-01"]
    rows = sum(storage.read_manifest(store, "silver", "ec2_cpu", p).rows for p in bronze)
    source_rows = sum(1 for _ in open(CORPUS / "data" / FILES["ec2_cpu"])) - 1
    assert rows == source_rows


def test_the_dataset_gets_its_own_registered_model_with_event_scores(ec2_run, settings):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    model = client.get_registered_model("ec2_cpu")
    assert model.aliases.get("champion") == "1"
    version = client.get_model_version("ec2_cpu", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["dataset_name"] == "ec2_cpu"
    assert run.data.tags["airflow_dag_id"] == "ec2_cpu_training"
    metrics = run.data.metrics
    # the windows file gave labels for evaluation: point and event metrics exist, none is NaN
    assert {"pr_auc", "f1", "event_windows", "event_windows_detected", "flags_per_day"} <= set(metrics)
    assert {"nab_standard", "nab_reward_low_FP_rate", "nab_reward_low_FN_rate"} <= set(metrics)
    assert metrics["event_windows"] == 2
    assert all(v == v for v in metrics.values())
    assert "value outside [" in run.data.tags["baseline_rule"]  # fitted per reading, not "temp > 32"
    # the default family: the causal streaming detector, alarming at its own NAB-chosen threshold
    assert run.data.params["model_family"] == "streaming_detector"
    assert run.data.params["threshold_choice"].startswith("detector_default")
    assert run.data.params["model_columns"] == "device,ts,value"
    # the readings plot is there, with the reading's name
    assert any(a.path == "plots" for a in client.list_artifacts(run.info.run_id))


def test_a_second_dataset_keeps_its_own_model_and_aliases(ec2_run, settings, capsys):
    from mlflow import MlflowClient

    assert _cli("land", "--file", str(CORPUS / "data" / FILES["art_jumps"]), "--dataset", "art_jumps") == 0
    assert _cli("run", "--dataset", "art_jumps") == 0
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    assert client.get_registered_model("art_jumps").aliases.get("champion") == "1"
    tags = client.get_model_version("art_jumps", "1").tags
    assert tags["gate.primary_metric"] == "nab_standard"
    assert float(tags["gate.challenger_nab_standard"]) == float(tags["gate.challenger_nab_standard"])  # a number
    # the first dataset's model was not gated against (or replaced by) the second's
    assert client.get_registered_model("ec2_cpu").aliases == {"champion": "1"}
    assert len(client.search_model_versions("name='ec2_cpu'")) == 1
    capsys.readouterr()
    assert _cli("datasets", "--json") == 0
    rows = {r["dataset"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["art_jumps"]["aliases"] == {"champion": "1"} and rows["art_jumps"]["rows"]["gold"] > 0
    assert rows["ec2_cpu"]["dags"] == [
        f"ec2_cpu_{kind}" for kind in ("lakehouse", "training", "canary", "monitoring", "stream_rebuild")
    ]


def test_summary_names_the_dataset_and_one_line_per_layer(ec2_run, capsys):
    capsys.readouterr()
    assert _cli("summary", "--dataset", "ec2_cpu") == 0
    out = capsys.readouterr().out
    assert "dataset ec2_cpu" in out and "model ec2_cpu" in out
    gate_lines = [line for line in out.splitlines() if "partitions passed" in line]
    assert len(gate_lines) == 3, out
    # the dataset's own gate results (not the default dataset's), bronze's filed under its delivery date
    assert not any(" 0/0 partitions" in line for line in gate_lines), out
    assert "events:" in out


def test_a_deterministic_failure_fails_at_once_with_its_own_error(user_datasets, tmp_path, capsys):
    """A file without the contract's columns fails bronze once (no retries) and the CLI prints the
    job's own error and the log's path, not Airflow's stack frames."""
    bad = tmp_path / "wrong-header.csv"
    bad.write_text("when,reading\n2014-02-14 14:30:00,1.5\n")
    assert _cli("land", "--file", str(bad), "--dataset", "art_jumps", "--date", "2026-03-01") == 0
    capsys.readouterr()
    assert _cli("run", "--dataset", "art_jumps", "2026-03-01", "--skip-training") == 1
    err = capsys.readouterr().err
    assert "DAG art_jumps_lakehouse failed (delivery_date 2026-03-01)" in err
    assert "wrong-header.csv" in err and "timestamp" in err, err  # the job's message: file and missing column
    assert "Traceback" not in err and "task_runner" not in err
    log = Path(err.split("task log: ")[1].split()[0])
    assert log.read_text().count("starting task_id=bronze") == 1  # not retried


def test_the_live_path_rebuild_dag_rebuilds_the_partitions_it_is_given(ec2_run, store):
    """The stream's bronze commits schedule <prefix>_stream_rebuild (its own Asset, not the
    lakehouse's bronze one); a run rebuilds silver and gold of the named partitions with the same jobs."""
    from pipelines import storage
    from pipelines.orchestration import run_dag

    before = storage.read_manifest(store, "silver", "ec2_cpu", "2014-02-01").run_id
    result = run_dag("ec2_cpu_stream_rebuild", conf={"partitions": ["2014-02-01"]}, progress=lambda _: None)
    assert result.succeeded
    silver = storage.read_manifest(store, "silver", "ec2_cpu", "2014-02-01")
    gold = storage.read_manifest(store, "gold", "ec2_cpu", "2014-02-01")
    assert silver.run_id != before and gold.run_id == silver.run_id
    assert silver.rows == gold.rows == 4032
