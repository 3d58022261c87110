"""DAG integrity: every DAG imports cleanly, is documented and owned, retries, and parses fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}, dagbag.import_errors
    assert {"iot_lakehouse", "iot_training"} <= set(dagbag.dag_ids)


def test_every_dag_has_owner_tags_retries_and_docs(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 100, f"{dag_id} has no doc_md"
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", f"{dag_id}.{t.task_id} has no owner"
            assert t.retries >= 1, f"{dag_id}.{t.task_id} does not retry"


def test_every_dataset_has_its_own_dags_and_assets(dagbag):
    from pipelines.datasets import catalogue

    for ds in catalogue().values():
        assert {ds.lakehouse_dag_id, ds.training_dag_id} <= set(dagbag.dag_ids), ds.name
        training = dagbag.dags[ds.training_dag_id]
        assert f"{ds.name}_gold" in str(training.timetable.asset_condition)
        outlets = {o.uri for t in dagbag.dags[ds.lakehouse_dag_id].tasks for o in t.outlets}
        assert f"s3://lake/gold/{ds.name}" in outlets
        assert f"dataset:{ds.name}" in dagbag.dags[ds.lakehouse_dag_id].tags


def test_every_image_contract_has_a_canary_dag_for_its_classifier(dagbag):
    from pipelines.images.contract import image_catalogue

    contracts = list(image_catalogue().values())
    assert contracts
    for contract in contracts:
        canary = dagbag.dags[f"{contract.name}_image_canary"]
        assert [t.task_id for t in canary.tasks] == ["start_if_ready", "evaluate"]
        assert contract.registered_model in canary.doc_md and f"dataset:{contract.name}" in canary.tags


def test_a_contract_in_a_user_folder_declares_its_dags_without_code(tmp_path):
    """A contract file in PLATFORM_CONTRACTS_DIR is a dataset: its DAGs appear, no code change."""
    import shutil

    src = Path(__file__).resolve().parents[2] / "pipelines" / "contracts" / "nab_machine_temperature.yaml"
    text = src.read_text().replace("name: nab_machine_temperature", "name: office_temp")
    (tmp_path / "office_temp.yaml").write_text(text)
    shutil.copytree(DAGS_DIR, tmp_path / "dags")
    code = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(tmp_path / 'dags')!r})\n"
        "print(sorted(bag.import_errors)); print(' '.join(sorted(bag.dag_ids)))"
    )
    env = {**__import__("os").environ, "PLATFORM_CONTRACTS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    errors, ids = out.stdout.strip().splitlines()[-2:]
    assert errors == "[]"
    assert {"office_temp_lakehouse", "office_temp_training", "iot_lakehouse"} <= set(ids.split())


def test_lakehouse_publishes_assets_that_schedule_training(dagbag):
    lake = dagbag.dags["iot_lakehouse"]
    outlets = {o.uri for t in lake.tasks for o in t.outlets}
    assert "s3://lake/gold/iot_telemetry" in outlets
    # Gold is announced once per run, downstream of every mapped gold task: training never starts
    # on a gold layer that other tasks of the same run are still rebuilding.
    announcing = [t for t in lake.tasks if "s3://lake/gold/iot_telemetry" in {o.uri for o in t.outlets}]
    assert [t.task_id for t in announcing] == ["gold_published"]
    assert "gold" in announcing[0].upstream_task_ids
    training = dagbag.dags["iot_training"]
    assert "iot_telemetry_gold" in str(training.timetable.asset_condition)


HEAVY_MODULES = ("pandas", "pyarrow", "sklearn", "mlflow", "great_expectations", "minio", "scipy")
# The dataset catalogue is what DAG files are declared from: it reads contract files and params.yaml
# only (PyYAML, pydantic); image contracts are their catalogue (pipelines.images.contract: the same two).
# Any other platform module at parse time is a mistake.
PARSE_TIME_PIPELINES = {
    "pipelines",
    "pipelines.datasets",
    "pipelines.settings",
    "pipelines.images",
    "pipelines.images.contract",
}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parse_loads_no_heavy_module(dag_file):
    """The dag-processor re-parses every file often: parsing must not load the data stack.

    Checked by what parsing loads (deterministic), not by a stopwatch: the parse time itself is
    a speed figure, and those belong in benchmarks, not in tests that flake on a busy machine."""
    code = (
        "import sys, runpy, airflow.sdk, airflow.timetables.interval\n"
        "before = set(sys.modules)\n"
        f"runpy.run_path({str(dag_file)!r})\n"
        "new = set(sys.modules) - before\n"
        "print(' '.join(sorted({m.split('.')[0] for m in new} | {m for m in new if m.startswith('pipelines')})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.strip().splitlines()[-1].split()) if out.stdout.strip() else set()
    heavy = sorted(loaded & set(HEAVY_MODULES)) + sorted(
        m for m in loaded if m.startswith("pipelines") and m not in PARSE_TIME_PIPELINES
    )
    assert not heavy, f"parsing {dag_file.name} loaded {heavy}: move those imports into the task functions"


def test_dag_files_do_not_import_heavy_libraries_at_top_level():
    for path in DAG_FILES:
        top = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        heavy = [
            line
            for line in top
            if any(m in line for m in ("pandas", "sklearn", "mlflow", "great_expectations"))
            or ("pipelines" in line and not any(m in line for m in ("pipelines.datasets", "pipelines.images.contract")))
        ]
        assert not heavy, f"{path.name} imports {heavy} at parse time"
