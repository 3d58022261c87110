"""The drift -> retraining -> canary loop end to end on the real stack, for a dataset of its own (the iot
contract under another name, so its lake, DAGs and registered model are this test's alone):

1. three clean simulated days and three with a +4 degC calibration offset on the temperature sensor go
   through the real lakehouse DAG; the first model is trained on the clean days and becomes champion;
2. the monitoring DAG judges the three drifted days, one window each: the alarm fires on the third and
   its raise_alarm task updates the dataset's drift Asset (earlier windows skip it);
3. the Airflow scheduler's own code turns the queued Asset event into a training run (the training DAG
   is scheduled by gold | drift), which reads the alarm from its triggering event, trains on every day,
   and registers a challenger tagged with the alarm;
4. the canary rolls it out through the real scoring service (shadow, then 100% with the champion
   shadowing) and promotes it;
5. a later drifted day, judged against the new champion's reference, no longer drifts: the alarm clears;
   `platform monitor` shows the chain alarm -> run -> version -> promotion;
6. the window of the canary's own traffic reports the served flags' performance against the labels
   posted to /feedback (each window before it, against the gold rows' labels).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAME = "drift_iot"
CLEAN = dt.date(2026, 3, 2)  # 3 clean days, then 3 drifted, then one more drifted after retraining
OFFSET = 4.0  # degC on every device's temperature sensor


def telemetry_csv(start: dt.date, days: int, offset: float) -> bytes:
    from pipelines.simulator import simulate_telemetry

    frame = simulate_telemetry(start, days, devices=4, freq_seconds=60, seed=42)
    frame["temp"] = (frame["temp"] + offset).round(3)
    for col in ("light", "motion"):
        frame[col] = frame[col].map({True: "true", False: "false"})
    return frame.to_csv(index=False, lineterminator="\n").encode()


def window_end(day: dt.date) -> str:
    return f"{day + dt.timedelta(days=1)}T00:00:00+00:00"


def day(i: int) -> dt.date:
    return CLEAN + dt.timedelta(days=i)


# The scheduler's step, run in a process configured as Airflow (roles, DB) like `airflow dags test`:
# DagModel.dags_needing_dagruns evaluates each asset-scheduled DAG's condition over the queued events,
# SchedulerJobRunner._create_dag_runs_asset_triggered creates the run with its consumed events, and
# dag.test() executes that run (its task reads them as triggering_asset_events).
ASSET_TRIGGERED_RUN = r"""
import json, sys
from unittest import mock
from sqlalchemy import select
from airflow.dag_processing.dagbag import DagBag
from airflow.jobs.job import Job
from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
from airflow.models.dag import DagModel
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from airflow.utils.state import DagRunState

dag_id = sys.argv[1]
with create_session() as session:
    query, triggered = DagModel.dags_needing_dagruns(session)
    needing = [d for d in query.all() if d.dag_id in triggered]
    ready = sorted(d.dag_id for d in needing)
    SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(
        dag_models=[d for d in needing if d.dag_id == dag_id], session=session
    )
    session.commit()
    run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_type == "asset_triggered")
                          .order_by(DagRun.id.desc())).first()
    run_id = run.run_id if run else None
    consumed = [{"uri": e.asset.uri, "extra": e.extra} for e in (run.consumed_asset_events if run else [])]


def queued_run(*, dag, session, **_):
    found = session.scalar(select(DagRun).where(DagRun.run_id == run_id, DagRun.dag_id == dag.dag_id))
    found.state = DagRunState.RUNNING
    session.commit()
    found.dag = dag  # as create_dagrun leaves it
    return found


state = None
if run_id:
    dag = DagBag().get_dag(dag_id)
    with mock.patch("airflow.models.dagrun.get_or_create_dagrun", queued_run):
        dag.test(logical_date=None)
    with create_session() as session:
        state = session.scalar(select(DagRun.state).where(DagRun.run_id == run_id, DagRun.dag_id == dag_id))
print("##result " + json.dumps({"ready": ready, "run_id": run_id, "consumed": consumed, "state": str(state)}))
"""


@pytest.fixture(scope="module")
def drift_dataset(tmp_path_factory, stack):
    """drift_iot: the iot contract and its params under another name."""
    folder = tmp_path_factory.mktemp("drift-contracts")
    contract = yaml.safe_load((REPO / "pipelines" / "contracts" / "iot_telemetry.yaml").read_text())
    contract["name"] = NAME
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = copy.deepcopy(params["datasets"]["iot_telemetry"])
    section.pop("dag_prefix", None)
    section.pop("model_name", None)
    params["datasets"][NAME] = section
    params["quality"][NAME] = copy.deepcopy(params["quality"]["iot_telemetry"])
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLATFORM_CONTRACTS_DIR", str(folder))
        mp.setenv("PLATFORM_PARAMS_FILE", str(params_file))
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        # the DAG runs' and the scoring service's OpenMP (HGB) threads spin against every other process
        # on a busy 2-core machine: one thread each (a training run took 287 s instead of ~15 s)
        mp.setenv("OMP_NUM_THREADS", "1")
        from pipelines.datasets import get_dataset

        yield get_dataset(NAME)


def airflow_process_env(settings) -> dict[str, str]:
    import os

    from pipelines.services import airflow_env

    return {**os.environ, **settings.client_env(), **airflow_env(settings)}


def unpause(settings, dag_id: str) -> None:
    """What a user does in the UI: a paused DAG is not queued by Asset events."""
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.airflow_sql_alchemy_conn)
    with engine.begin() as conn:
        assert conn.execute(text("UPDATE dag SET is_paused = 0 WHERE dag_id = :d"), {"d": dag_id}).rowcount == 1
    engine.dispose()


@pytest.fixture(scope="module")
def loop(drift_dataset, store, settings):
    """Steps 1-3: lake, champion, monitoring windows, the asset-triggered retraining."""
    from pipelines.jobs.lake import land_bytes
    from pipelines.orchestration import DagRunRequest, run_dags

    ds = drift_dataset
    land_bytes(store, NAME, str(day(0)), "clean.csv", telemetry_csv(day(0), 3, 0.0))
    land_bytes(store, NAME, str(day(3)), "drifted.csv", telemetry_csv(day(3), 3, OFFSET))
    clean = [str(day(i)) for i in range(3)]
    run_dags(
        [
            DagRunRequest(ds.lakehouse_dag_id, conf={"delivery_date": str(day(0))}),
            DagRunRequest(ds.lakehouse_dag_id, conf={"delivery_date": str(day(3))}),
            DagRunRequest(ds.training_dag_id, conf={"partitions": clean}),  # the model before the drift
        ],
        progress=lambda _: None,
    )
    unpause(settings, ds.training_dag_id)
    windows = run_dags(
        [DagRunRequest(ds.monitoring_dag_id, conf={"window_end": window_end(day(i))}) for i in (3, 4, 5)],
        progress=lambda _: None,
    )
    out = subprocess.run(
        [sys.executable, "-c", ASSET_TRIGGERED_RUN, ds.training_dag_id],
        env=airflow_process_env(settings),
        cwd=str(settings.state_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [line for line in out.stdout.splitlines() if line.startswith("##result ")]
    assert out.returncode == 0 and results, (out.stdout[-3000:], out.stderr[-3000:])
    return {"windows": windows, "retraining": json.loads(results[-1].removeprefix("##result "))}


def reports(store, dataset: str) -> list[dict]:
    from pipelines.monitoring.job import recent_reports

    return recent_reports(store, dataset, n=50)


def client_of(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in (client.get_registered_model(NAME).aliases or {}).items()}


def test_the_alarm_fires_within_3_drifted_windows_and_updates_the_drift_asset(loop, store, settings, drift_dataset):
    from pipelines.monitoring.performance import describe

    judged = [r["context"] for r in reports(store, NAME)]
    assert [w["window_end"] for w in judged] == [window_end(day(i)) for i in (3, 4, 5)]
    assert [w["window_drift"] for w in judged] == [True, True, True], [w["reasons"] for w in judged]
    assert [w["alarm"] for w in judged] == [False, False, True]
    assert {w["model_version"] for w in judged} == {"1"} and judged[0]["scores_from"] == "replayed with v1"
    assert "temp" in judged[-1]["alarm_features"]
    alarm_id = judged[-1]["alarm_id"]
    assert alarm_id == f"{NAME}-v1-{day(6):%Y%m%d}T0000Z"
    # each window has its HTML report and figure in the lake and an MLflow run with them
    bucket = settings.lake_bucket
    for w in judged:
        prefix = f"monitoring/{NAME}/window={w['window_start'][:10]}T000000Z/"
        assert "ALARM" in store.get_bytes(bucket, prefix + "report.html").decode() or not w["alarm"]
        assert store.get_bytes(bucket, prefix + "figure.png")[:4] == b"\x89PNG"
        files = {f.path for f in client_of(settings).list_artifacts(w["mlflow_run_id"], "monitoring")}
        assert files == {"monitoring/report.html", "monitoring/report.json", "monitoring/figure.png"}
        # performance against the simulator's labels in gold (no feedback: no prediction log covers March)
        perf = w["performance"]
        print(f"\nwindow {w['window_end'][:10]}: {describe(perf)}")
        assert perf["source"] == "gold labels" and perf["labelled_rows"] == w["rows"] and perf["positives"] > 0, perf
        assert perf["flags_from"] == "replayed with v1" and perf["events"] > 0 and perf["f1"] is not None
        run = client_of(settings).get_run(w["mlflow_run_id"])
        assert run.data.metrics["perf_f1"] == pytest.approx(perf["f1"]) and run.data.tags["performance_source"] == (
            "gold labels"
        )
    # the asset event carries the alarm (only the third window emitted it: the first two skipped the task)
    consumed = loop["retraining"]["consumed"]
    drift_events = [e for e in consumed if e["uri"] == drift_dataset.drift_asset_uri()]
    assert [e["extra"]["alarm_id"] for e in drift_events] == [alarm_id], consumed
    assert "temp" in drift_events[0]["extra"]["features"]


def test_the_drift_asset_alone_schedules_a_training_run_tagged_with_the_alarm(loop, settings, drift_dataset):
    retraining = loop["retraining"]
    assert drift_dataset.training_dag_id in retraining["ready"], retraining
    assert retraining["state"] == "success", retraining
    # queued by the drift event alone: the training DAG was paused while gold was published
    assert drift_dataset.drift_asset_uri() in {e["uri"] for e in retraining["consumed"]}
    client = client_of(settings)
    exp = client.get_experiment_by_name(settings.mlflow_experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.airflow_run_id = '{retraining['run_id']}'")
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert (
        tags["monitoring.alarm_id"] == f"{NAME}-v1-{day(6):%Y%m%d}T0000Z" and tags["retrain.trigger"] == "drift alarm"
    )
    assert tags["dataset_name"] == NAME and "temp" in tags["monitoring.alarm_features"]
    (version,) = client.search_model_versions(f"name='{NAME}' and run_id='{runs[0].info.run_id}'")
    assert version.version == "2" and version.tags["monitoring.alarm_id"] == tags["monitoring.alarm_id"]
    assert aliases(client) == {"champion": "1", "challenger": "2"}


@pytest.fixture(scope="module")
def promoted(loop, store, settings, drift_dataset):
    """Step 4: the challenger through the canary (shadow, then all traffic with the champion shadowing)."""
    from pipelines.canary import controller
    from pipelines.canary import state as st
    from pipelines.jobs.lake import read_gold
    from pipelines.settings import load_params
    from tests.integration.test_serving import ServiceProcess

    params = copy.deepcopy(load_params())
    params["canary"]["experiment"] = "canary-tests"
    # 4 devices: a 10% or 50% step may route no device at all, so this rollout goes shadow -> full
    steps = {s["name"]: s for s in params["canary"]["steps"]}
    params["canary"]["steps"] = [steps["shadow"], steps["full"]]
    for step in params["canary"]["steps"]:
        step.update(min_requests=150, bake_minutes=0)
    params["canary"]["analysis"]["min_labels"] = 100
    # The canary's own rules decide, the score-rank check included: two gradient-boosting versions order
    # the ~1e-7 probabilities of normal records differently (rho 0.30 on 600 paired records, measured
    # here), and the labelled F1 on the same records overrules it (canary.analysis._labels_decide_over_ranks).
    gold, _ = read_gold([str(day(5))], dataset=NAME, store=store)
    traffic = gold.sample(n=1200, random_state=7).reset_index(drop=True)
    with ServiceProcess(NAME) as svc:
        svc.wait_for(lambda s: s["models"]["challenger"] == "2", what="challenger loaded")
        state = controller.start_rollout(actor="test", reason="retrained on drift", params=params, dataset=NAME)
        results = []
        for i, step in enumerate(["shadow", "full"]):
            svc.wait_for(
                lambda s, step=step, rollout=state.rollout_id: (
                    (s["rollout"] or {}).get("step_name") == step and (s["rollout"] or {}).get("rollout_id") == rollout
                ),
                what=f"step {step}",
            )
            send(svc, traffic.iloc[i * 600 : (i + 1) * 600], f"step{i}")
            results.append(controller.evaluate_step(actor="test-canary", params=params, dataset=NAME))
            state = st.read_state(store, NAME)
    return results


def send(svc, frame: pd.DataFrame, tag: str, per_request: int = 10) -> None:
    from pipelines.training import feature_columns

    cols = ["device", *feature_columns(frame)]
    labels = []
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        for start in range(0, len(frame), per_request):
            chunk = frame.iloc[start : start + per_request]
            rid = f"{tag}-{start}"
            r = c.post("/score", json={"records": chunk[cols].to_dict("records"), "request_id": rid})
            assert r.status_code == 200, r.text
            labels += [
                {"request_id": rid, "record_index": i, "is_anomaly": int(y)} for i, y in enumerate(chunk["is_anomaly"])
            ]
        assert c.post("/feedback", json={"labels": labels}).status_code == 200
    svc.flush()


def test_the_canary_promotes_the_retrained_version(promoted, settings):
    assert [r["action"] for r in promoted] == ["advance", "promote"], [r["verdict"] for r in promoted]
    assert aliases(client_of(settings)) == {"champion": "2", "previous": "1"}


def test_the_alarm_clears_against_the_new_reference_and_the_chain_is_queryable(
    promoted, store, settings, drift_dataset, capsys
):
    from pipelines.cli import main
    from pipelines.jobs.lake import land_bytes
    from pipelines.orchestration import DagRunRequest, run_dags

    ds = drift_dataset
    land_bytes(store, NAME, str(day(6)), "later.csv", telemetry_csv(day(6), 1, OFFSET))
    run_dags(
        [
            DagRunRequest(ds.lakehouse_dag_id, conf={"delivery_date": str(day(6))}),
            DagRunRequest(ds.monitoring_dag_id, conf={"window_end": window_end(day(6))}),
        ],
        progress=lambda _: None,
    )
    last = reports(store, NAME)[-1]["context"]
    assert last["window_end"] == window_end(day(6)) and last["model_version"] == "2"
    assert (last["window_drift"], last["alarm"], last["status"]) == (False, False, "ok"), last["reasons"]

    assert main(["monitor", "--dataset", NAME]) == 0
    out = capsys.readouterr().out
    alarm_id = f"{NAME}-v1-{day(6):%Y%m%d}T0000Z"
    assert alarm_id in out and "ALARM" in out and "-> version 2" in out and "promoted to champion" in out, out
    assert main(["monitor", "--dataset", NAME, "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)["alarms"]
    (record,) = chain
    (training,) = record["trainings"]
    (version,) = training["versions"]
    assert record["alarm_id"] == alarm_id and version["version"] == "2"
    assert version["rollout"]["event"] == "promoted to champion" and "champion" in version["aliases"]


def test_a_window_with_feedback_in_the_lake_reports_performance_on_it_in_its_mlflow_run(
    promoted, store, settings, drift_dataset
):
    """Step 6 (last: it judges a window of today, after the simulated days). The canary's steps sent
    600 records of day 5 each, served by v1 (shadow step) and v2 (full step), labelled through
    /feedback: the window measures the served flags of the version it judges against those labels."""
    from pipelines.jobs.lake import read_gold
    from pipelines.monitoring.loop import monitor_window
    from pipelines.monitoring.performance import describe

    gold, _ = read_gold([str(day(5))], dataset=NAME, store=store)
    traffic = gold.sample(n=1200, random_state=7).reset_index(drop=True)  # as `promoted` sent it
    end = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    out = monitor_window(end, dataset=NAME, store=store, progress=lambda _: None)
    # The window judges the version that served most of it as champion: v1 served the shadow step's
    # 600 records; v2 the full step's 600, and as champion whatever earlier steps sent after it was
    # promoted (unlabelled). Either way the labelled records are the 600 of its step.
    version = out["model_version"]
    assert version in ("1", "2") and out["performance"]["source"] == "feedback", out
    served = traffic.iloc[:600] if version == "1" else traffic.iloc[600:]
    perf = reports(store, NAME)[-1]["context"]["performance"]
    assert perf["labelled_rows"] == 600 and perf["positives"] == int(served["is_anomaly"].sum()) > 0, perf
    assert perf["flags_from"].startswith("prediction log") and perf["recall"] is not None
    print(f"\nv{version} on its canary step: {describe(perf)}")
    run = client_of(settings).get_run(out["mlflow_run_id"])
    assert run.data.tags["performance_source"] == "feedback" and run.data.metrics["perf_labelled_rows"] == 600
    assert run.data.metrics["perf_f1"] == pytest.approx(perf["f1"])
    assert run.data.metrics["perf_event_recall"] == pytest.approx(perf["event_recall"])
    html = store.get_bytes(settings.lake_bucket, out["report"] + "report.html").decode()
    assert "Performance against labels" in html and "Labels from <b>feedback</b>" in html
