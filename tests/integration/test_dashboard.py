"""`platform dashboard` in headless Chromium against the real stack, while readings stream in.

Readings go the live path's way: published over MQTT (a Mosquitto of this module's own), committed to
bronze by the ingester; a model is registered in the session's MLflow (v1 @champion, v2 @challenger)
with a canary rollout at its shadow step in the lake, and one monitoring window's drift report is
written with the monitoring job's own functions. The page must show the readings of every device with
the champion's anomalies in red and normal points in blue, the versions with their aliases, the canary
stage, the alerts and the drift per feature; and it must follow the stream without a reload.

Screenshots: test-artifacts/dashboard/ (git-ignored), paths printed. Uses Debian's Chromium as
the UI checks in tests/stack/test_celery_scaleout.py do (no Playwright browser download).
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from pipelines.services import free_port
from tests.browser import chromium, screenshot
from tests.integration.test_stream import Broker, gateway, readings, stream_settings, wait_for

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
DATASET = "iot_telemetry.dashboard"
EMPTY = "iot_telemetry.dashboard_empty"  # nothing landed, no model, no reports: the page still works
MODEL = "dashboard-test-detector"
FEATURES = ["temp", "temp_roll_std", "temp_zscore", "temp_delta", "temp_long_dev", "humidity_flat_count"]
START = dt.date.today() - dt.timedelta(days=2)
BLUE, RED = "rgb(31, 119, 180)", "rgb(255, 0, 0)"


@functools.cache
def _gold_of_a_simulated_day(day: dt.date) -> pd.DataFrame:
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.layers.gold import to_gold
    from pipelines.layers.silver import to_silver
    from pipelines.simulator import simulate_day_csv

    contract = load_contract(get_dataset("iot_telemetry").contract_path)
    raw = pd.read_csv(io.BytesIO(simulate_day_csv(day, 4, 60, 7)), dtype=str)
    raw["_parse_error"] = None
    silver, _ = to_silver(raw, contract)
    return to_gold(silver, contract, "15min", long_window="4h")


@pytest.fixture(scope="module")
def versions(settings, store) -> dict[str, str]:
    """A real IsolationForest on gold features, registered twice: v1 @champion, v2 @challenger, and
    the canary's rollout of v2 at its first (shadow) step, as `iot_canary` would have started it."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mlflow
    from mlflow import MlflowClient
    from pipelines import training
    from pipelines.canary import state as rollout
    from pipelines.canary.stages import load_plan
    from pipelines.datasets import effective_params

    gold = _gold_of_a_simulated_day(START - dt.timedelta(days=5))
    model = training.AnomalyScorer(
        Pipeline([("scale", StandardScaler()), ("model", IsolationForest(n_estimators=50, random_state=0))])
    ).fit(gold[FEATURES])
    scores = model.predict(gold[FEATURES])
    uri = settings.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("dashboard-tests")
    with mlflow.start_run():
        mlflow.log_metric("decision_threshold", float(np.quantile(scores, 0.97)))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(gold[FEATURES], scores),
            serialization_format="skops",
            skops_trusted_types=training.SKOPS_TRUSTED_TYPES,
            pip_requirements=["scikit-learn", "skops"],
        )
    for _ in range(2):  # the same model twice: a retrain that changed nothing, as far as the page cares
        mlflow.register_model(info.model_uri, MODEL)
    client = MlflowClient(uri, registry_uri=uri)
    found = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    champion, challenger = str(found[-2]), str(found[-1])
    client.set_registered_model_alias(MODEL, "champion", champion)
    client.set_registered_model_alias(MODEL, "challenger", challenger)
    plan = load_plan(effective_params(DATASET))
    state = rollout.start(plan, champion, challenger, actor="test", reason="dashboard test")
    rollout.write_state(store, replace(state, model_name=MODEL))
    return {"champion": champion, "challenger": challenger, "step": state.step_name}


@pytest.fixture(scope="module")
def drift_reported(store):
    """Three monitoring windows of this dataset, judged and written by the monitoring job's own
    functions: the reference is a simulated day's gold, each window the same features with temp 3
    degrees higher (a calibration drift), so the third window alarms (3 of the last 4)."""
    from pipelines.monitoring.drift import reference_profile
    from pipelines.monitoring.job import save_window_report
    from pipelines.monitoring.loop import judge_window, policy_for

    reference = _gold_of_a_simulated_day(START - dt.timedelta(days=5))  # the model's own training day
    profile = reference_profile(reference, FEATURES)
    window = reference.assign(temp=reference["temp"] + 3.0)
    history: list[dict] = []
    for day in range(3):
        verdict = judge_window(profile, window, None, policy_for(DATASET), history)
        start = dt.datetime.combine(START - dt.timedelta(days=3 - day), dt.time(0), tzinfo=dt.UTC)
        context = {**verdict.summary(), "window_start": start.isoformat(), "model_version": "1"}
        save_window_report(store, DATASET, start, verdict.report, html="<p>test</p>", figure=b"", context=context)
        history.append(verdict.summary())
    assert verdict.drifted and verdict.alarm and "temp" in verdict.responsible
    return verdict


@pytest.fixture(scope="module")
def live_path(store):
    """A broker, the ingester committing to bronze, and a gateway publishing the simulated fleet."""
    from pipelines.streaming.ingester import build_ingester

    broker = Broker().start()
    ingester = pub = None
    try:
        cfg = stream_settings(broker, DATASET, batch_max_seconds=0.3)
        ingester = build_ingester(DATASET, cfg, store=store).start()
        assert ingester.wait_connected(10)
        pub = gateway(broker, "gw-dashboard")
        yield {"ingester": ingester, "pub": pub}
    finally:
        if pub is not None:
            pub.close()
        if ingester is not None:
            ingester.stop()
        broker.stop()
        shutil.rmtree(broker.dir, ignore_errors=True)


def publish(live_path, data: list[dict]) -> None:
    ingester, pub = live_path["ingester"], live_path["pub"]
    before = ingester.stats.committed_rows
    for reading in data:
        pub.publish(DATASET, reading)
    pub.flush(30)
    wait_for(lambda: ingester.stats.committed_rows >= before + len(data), 60, "the readings committed to bronze")


@pytest.fixture(scope="module")
def fleet() -> tuple[list[dict], list[dict]]:
    """A day of 3 devices, one reading a minute, with the simulator's faults: the first 20 hours
    streamed before the page opens, the rest while it is open."""
    data = readings(devices=3, days=1, start=START)
    cut = next(i for i, r in enumerate(data) if r["ts"] >= data[0]["ts"] + 20 * 3600)
    return data[:cut], data[cut:]


@pytest.fixture(scope="module")
def dashboard(settings, store, versions, drift_reported):
    import uvicorn

    from pipelines.dashboard.app import create_app
    from pipelines.dashboard.data import Dashboard, DashboardConfig

    board = Dashboard(
        [DATASET, EMPTY],
        settings=settings,
        store=store,
        cfg=DashboardConfig(refresh_seconds=0.5, slow_refresh_seconds=2.0),
        model_names={DATASET: MODEL, EMPTY: MODEL + "-never-registered"},
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(board), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the dashboard to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with chromium(timeout_ms=60_000) as context:
        yield context


def shot(page, name: str) -> Path:
    return screenshot(page, ARTIFACTS, name)


def snapshot(url: str, dataset: str = DATASET) -> dict:
    return httpx.get(f"{url}/api/snapshot", params={"dataset": dataset}, timeout=30).json()


def test_thinned_series_keep_every_anomaly_and_their_order():
    from pipelines.dashboard.data import device_series

    n = 5000
    frame = pd.DataFrame(
        {
            "device": "d",
            "ts": pd.date_range("2026-01-01", periods=n, freq="1min", tz="UTC"),
            "temp": np.arange(n, dtype=float),
            "score": np.zeros(n),
            "flagged": np.where(np.arange(n) % 97 == 5, 1, 0).astype("int8"),
        }
    )
    series = device_series(frame, "temp", max_points=500)["d"]
    assert series["anomalies"] == int((frame["flagged"] == 1).sum()) == sum(series["f"])
    assert len(series["t"]) <= 500 + series["anomalies"] and series["t"] == sorted(series["t"])
    assert series["v"][0] == 0.0 and series["v"][-1] == n - 1  # the range's ends stay


def test_the_cli_has_the_dashboard_command():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["dashboard", "--dataset", DATASET, "--port", "8799", "--model-name", MODEL])
    assert args.func.__name__ == "cmd_dashboard" and args.port == 8799 and args.dataset == [DATASET]


def test_the_page_shows_readings_anomalies_models_canary_alerts_and_drift_live(
    dashboard, browser, live_path, fleet, versions, drift_reported
):
    first, rest = fleet
    publish(live_path, first)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(f"{dashboard}/?dataset={DATASET}")

    # the champion scored the streamed readings: anomalies red, normal points blue, on every device
    page.locator("#charts svg circle.anomaly").first.wait_for()
    charts = page.locator("#charts .chart")
    assert charts.count() == 3
    for i in range(3):
        assert charts.nth(i).locator("circle.normal").count() > 100
    anomalies = page.locator("#charts circle.anomaly").count()
    assert 0 < anomalies < page.locator("#charts circle.normal").count() / 5
    fills = page.evaluate(
        """() => ['normal', 'anomaly'].map(c => getComputedStyle(document.querySelector('#charts circle.' + c)).fill)"""
    )
    assert fills == [BLUE, RED]

    # each point's colour is its score against the served model's threshold (the API the page draws)
    snap = snapshot(dashboard)
    assert snap["scored"] and snap["threshold"] is not None
    for series in snap["series"].values():
        for flag, score in zip(series["f"], series["s"], strict=True):
            assert flag == int(score >= snap["threshold"] - 1e-6) or abs(score - snap["threshold"]) < 1e-5
    assert sum(s["anomalies"] for s in snap["series"].values()) == anomalies

    # model versions with their aliases, and the canary's stage
    models = page.locator("#models")
    models.get_by_text(f"v{versions['champion']}", exact=True).wait_for()
    champion_row = models.locator("tr", has=page.get_by_text(f"v{versions['champion']}", exact=True))
    assert "@champion" in champion_row.inner_text() and "serving as champion" in champion_row.inner_text()
    challenger_row = models.locator("tr", has=page.get_by_text(f"v{versions['challenger']}", exact=True))
    assert "@challenger" in challenger_row.inner_text()
    assert page.locator("#canary-stage").inner_text() == f"{versions['step']} (running)"  # params.yaml: shadow

    # alerts: the newest flagged readings, each at or above its threshold
    alert_rows = page.locator("#alerts tr")
    assert alert_rows.count() > 1
    assert snap["alerts"] and all(a["score"] >= a["threshold"] for a in snap["alerts"])

    # drift per feature from the monitoring job's report
    drift = page.locator("#drift")
    drift.get_by_text("temp", exact=True).wait_for()
    temp_row = drift.locator("tr", has=page.get_by_text("temp", exact=True))
    assert "drift" in temp_row.inner_text()
    assert drift.locator(".windows span.drift").count() == 3  # three drifted windows, the last alarms
    assert drift.locator(".windows span.alarm").count() == 1
    assert page.locator("#drift-status").inner_text().endswith("ALARM")
    first_shot = shot(page, "01-dashboard")

    # live: more readings stream in; the page follows without a reload
    last_before = snap["series"]["device-01"]["last"]
    n_before = len(snap["series"]["device-01"]["t"])
    publish(live_path, rest)
    wait_for(lambda: snapshot(dashboard)["series"]["device-01"]["last"] > last_before, 30, "the new readings scored")
    page.wait_for_function(
        "([before]) => { const h = document.querySelector('#charts .chart[data-device=\"device-01\"] h3');"
        " return h && !h.textContent.includes(before); }",
        arg=[last_before.replace("T", " ")[:19]],
        timeout=30_000,
    )
    after = snapshot(dashboard)["series"]["device-01"]
    assert len(after["t"]) > n_before
    shot(page, "02-dashboard-after-more-readings")

    # one device on its own
    page.select_option("#device", "device-02")
    page.wait_for_function("() => document.querySelectorAll('#charts .chart').length === 1")
    assert page.locator("#charts .chart").get_attribute("data-device") == "device-02"
    shot(page, "03-dashboard-one-device")
    assert not errors, errors
    assert first_shot.stat().st_size > 20_000
    page.close()


def test_a_dataset_with_nothing_yet_says_so(dashboard, browser):
    page = browser.new_page()
    page.goto(f"{dashboard}/?dataset={EMPTY}")
    page.get_by_text("nothing in bronze yet for this dataset").wait_for()
    page.locator("#drift").get_by_text("no monitoring window has been reported").wait_for()
    page.locator("#models").get_by_text("not registered yet").wait_for()
    assert page.locator("#charts circle").count() == 0
    shot(page, "04-dashboard-empty-dataset")
    unknown = httpx.get(f"{dashboard}/api/snapshot", params={"dataset": "nope"}, timeout=10)
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    page.close()


def test_the_page_loads_nothing_from_elsewhere(dashboard):
    html = httpx.get(dashboard + "/", timeout=10)
    assert html.status_code == 200
    assert "http://" not in html.text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html.text
    assert "default-src 'self'" in html.headers["content-security-policy"]
    assert json.loads(httpx.get(dashboard + "/api/datasets", timeout=10).text)["datasets"] == [DATASET, EMPTY]
