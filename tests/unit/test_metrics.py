"""GET /metrics of the scoring service and of the ingester, after real traffic over real HTTP.

The scoring service is `pipelines.serving.app.create_app` on uvicorn with a registered model (the
session's MLflow and object store); the ingester is `build_ingester` on a Mosquitto of its own with
its state served by `pipelines.streaming.http` (as `platform stream --http-port` serves it).
Each check reads the Prometheus text format with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.services import free_port
from tests.integration.test_serving import register_model, set_alias, traffic_frame
from tests.integration.test_stream import Broker, gateway, readings, stream_settings, wait_for

MODEL = "metrics-test-detector"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics answer."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60, "uvicorn to start")
    return server, thread


@pytest.fixture(scope="module")
def model_version(settings) -> str:
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    uri = settings.mlflow_tracking_uri
    version = register_model(uri, MODEL, "good", seed=0)
    set_alias(uri, MODEL, "champion", version)
    return version


def test_scoring_service_exposes_requests_latency_and_model_version(settings, store, model_version):
    from pipelines.serving.app import create_app
    from pipelines.serving.config import ServingSettings

    cfg = ServingSettings(model_name=MODEL, poll_seconds=3600, log_flush_seconds=3600)
    port = free_port()
    server, thread = serve(create_app(settings, cfg, store), port)
    try:
        url = f"http://127.0.0.1:{port}"
        records = traffic_frame(20, seed=3)[["device", "temp", "temp_roll_std"]].to_dict("records")
        for _ in range(3):
            r = httpx.post(url + "/score", json={"records": records}, timeout=30)
            assert r.status_code == 200, r.text
        bad = httpx.post(url + "/score", json={"records": [{"device": "d", "temp": "hot"}]}, timeout=30)
        assert bad.status_code == 422
        answer = httpx.get(url + "/metrics", timeout=10)
    finally:
        server.should_exit = True
        thread.join(30)

    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    found = samples(answer.text)
    assert value(found, "platform_scoring_requests_total", endpoint="score", status="200") == 3
    assert value(found, "platform_scoring_requests_total", endpoint="score", status="422") == 1
    assert value(found, "platform_scoring_latency_seconds_count", endpoint="score") == 4
    assert 0 < value(found, "platform_scoring_latency_seconds_sum", endpoint="score") < 30
    assert value(found, "platform_model_version_info", model=MODEL, role="champion", version=model_version) == 1
    stage = [k for k in found if k[0] == "platform_canary_stage_info" and ("model", MODEL) in k[1]]
    assert stage and ("status", "idle") in stage[0][1], stage  # no rollout of this model was started


def test_ingester_exposes_received_committed_quarantined_commit_latency_and_alerts(settings, store, model_version):
    from pipelines.serving.models import ModelManager
    from pipelines.streaming.http import serve_in_thread, state_app
    from pipelines.streaming.ingester import build_ingester

    dataset = "iot_telemetry.metrics_test"
    manager = ModelManager(settings, MODEL, 3600, store)
    manager.poll_once()
    assert manager.get("champion") is not None, manager.problems
    data = readings(devices=2, days=1)[:400]
    broker = Broker().start()
    ingester = pub = server = None
    try:
        cfg = stream_settings(broker, dataset, scoring=True)
        ingester = build_ingester(dataset, cfg, store=store, models=manager).start()
        assert ingester.wait_connected(10)
        port = free_port()
        server = serve_in_thread(state_app(ingester.scoring.state, ingester.status), "127.0.0.1", port)
        pub = gateway(broker, "gw-metrics")
        for reading in data:
            pub.publish(dataset, reading)
        pub.publish_raw(f"sensors/{dataset}/device-01", b"{not json")
        pub.flush(30)
        wait_for(lambda: ingester.stats.committed_rows >= len(data), 60, "every reading committed")
        wait_for(lambda: ingester.scoring.scored >= len(data), 60, "every reading scored")
        wait_for(lambda: _port_answers(port), 10, "the state endpoint")
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        alerts = ingester.scoring.alerts
    finally:
        for thing in (pub,):
            if thing is not None:
                thing.close()
        if ingester is not None:
            ingester.stop()
        if server is not None:
            server.should_exit = True
        broker.stop()

    assert answer.status_code == 200
    found = samples(answer.text)
    assert value(found, "platform_stream_readings_received_total", dataset=dataset) == len(data) + 1
    assert value(found, "platform_stream_readings_committed_total", dataset=dataset) == len(data)
    refused = {
        dict(k[1])["rule"]: v
        for k, v in found.items()
        if k[0] == "platform_stream_readings_quarantined_total" and ("dataset", dataset) in k[1]
    }
    assert sum(refused.values()) == 1, refused  # the malformed message, under the rule it broke
    assert value(found, "platform_stream_commit_seconds_count", dataset=dataset) == ingester.stats.commits >= 1
    assert value(found, "platform_stream_readings_scored_total", dataset=dataset) == len(data)
    assert value(found, "platform_stream_alerts_published_total", dataset=dataset) == alerts
    assert value(found, "platform_model_version_info", model=MODEL, role="champion", version=model_version) == 1


def _port_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.05)
        return False
