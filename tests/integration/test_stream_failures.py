"""A worker thread of the live path that dies is never silent: against the real broker and object
store (the fixtures of test_stream), a bronze stream batch that is no longer Parquet (its manifest
still names it) makes the intake thread raise when the ledger reads it back. The ingester then
answers /health with 503 naming the thread and the error, shows it on /status, and `platform
stream` exits non-zero. A scorer child that cannot bind its HTTP port exits non-zero naming it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.test_stream import (
    REPO,
    USERS,
    free_port,
    gateway,
    readings,
    stream_settings,
    wait_for,
)


def _corrupt_committed_batch(store, settings, dataset: str) -> list[dict]:
    """Commit a device's first readings to bronze as the ingester does, then overwrite the batch's
    file with bytes that are not Parquet (the manifest still names it). Returns the readings that
    come after them, for the same event date."""
    from pipelines import storage
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.streaming.commit import BronzeCommitter
    from pipelines.streaming.messages import MessageReader, sensor_topic

    ds = get_dataset(dataset)
    contract = load_contract(ds.contract_path)
    reader = MessageReader(dataset, contract)
    data = [r for r in readings(devices=1) if r["seq"] < 20]
    items = reader.read_many([(sensor_topic(dataset, r["device"]), json.dumps(r).encode()) for r in data[:10]])
    committer = BronzeCommitter(store, dataset, contract, reader.columns, ds.grain, "stream-test-failures")
    result = committer.commit(items)
    assert result.rows == 10 and len(result.partitions) == 1, result
    (partition,) = result.partitions
    keys = [f["key"] for f in storage.read_manifest(store, "bronze", dataset, partition).files]
    assert keys
    for key in keys:
        store.put_bytes(settings.lake_bucket, key, b"this object is not a parquet file")
    return data[10:]


class _State:
    def devices(self) -> list[str]:
        return []

    def get(self, device: str) -> None:
        return None

    def ping(self) -> bool:
        return True


def test_a_dead_intake_thread_makes_health_fail_naming_it(broker, settings, store):
    from pipelines.streaming.http import serve_in_thread, state_app
    from pipelines.streaming.ingester import Ingester

    dataset = "iot_telemetry.stream_dead_intake"
    later = _corrupt_committed_batch(store, settings, dataset)
    cfg = stream_settings(broker, dataset, client_id=f"ingester-{dataset}")
    ingester = Ingester(dataset, cfg, store=store)
    told = []
    ingester.on_failure = lambda: told.append(True)
    ingester.start()
    port = free_port()
    server = serve_in_thread(state_app(_State(), ingester.status, ingester.failure), "127.0.0.1", port)
    pub = gateway(broker, "gw-dead-intake")
    try:
        assert ingester.wait_connected(10)
        health = wait_for(lambda: _get(port, "/health"), 10, "the HTTP server")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        pub.publish(dataset, later[0])
        pub.flush(10)
        wait_for(lambda: ingester.failure(), 10, "the intake thread to die")
        health = _get(port, "/health")
        status = _get(port, "/status").json()
        intake = next(t for t in ingester._threads if t.name == "stream-intake")
        intake.join(5)
        alive = intake.is_alive()
        ingester.stop(timeout=10)  # the SIGTERM path still ends: the committer sees the intake gone
        stopped = not any(t.is_alive() for t in ingester._threads)
    finally:
        server.should_exit = True
        pub.close()
    assert health.status_code == 503, health.text
    body = health.json()["status"]
    assert body.startswith("failed: stream-intake died: ArrowInvalid:"), body
    assert status["failed"] == body.removeprefix("failed: ")
    assert told == [True], "on_failure is called once"
    assert not alive and stopped
    assert ingester.stats.committed_rows == 0 and ingester.stats.acked == 0  # redelivered to the next session


def _get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
    except httpx.HTTPError:
        return None


def _stream_env(dataset: str) -> dict[str, str]:
    return os.environ | {
        "PLATFORM_STREAM_MQTT_USERNAME": "ingester",
        "PLATFORM_STREAM_MQTT_PASSWORD": USERS["ingester"],
        "PLATFORM_STREAM_CLIENT_ID": f"ingester-{dataset}",
        "PLATFORM_STREAM_BATCH_MAX_SECONDS": "0.5",
    }


def test_platform_stream_exits_non_zero_when_its_intake_thread_dies(broker, settings, store, tmp_path):
    """As deployed (compose: the default role, an HTTP port): the ingester process and its scorer
    child, which serves HTTP. The intake thread dies on the corrupt batch: the process says why,
    stops as on SIGTERM (its child ends with the pipe) and exits 1, for its supervisor to restart it."""
    dataset = "iot_telemetry.stream_dead_intake_cli"
    later = _corrupt_committed_batch(store, settings, dataset)
    log_path = tmp_path / "stream.log"
    http_port = free_port()
    cmd = [sys.executable, "-m", "pipelines.cli", "stream", "--dataset", dataset, "--no-scoring"]
    cmd += ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--http-port", str(http_port)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_stream_env(dataset), stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )
    pub = gateway(broker, "gw-dead-intake-cli")
    try:
        wait_for(lambda: _get(http_port, "/health"), 30, "`platform stream` (its scorer child) to serve /health")
        child = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(child) == 1, child
        wait_for(lambda: "connected (session present" in log_path.read_text(), 10, "the ingester to subscribe")
        started = time.monotonic()
        pub.publish(dataset, later[0])
        pub.flush(10)
        code = proc.wait(20)
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pub.close()
    log = log_path.read_text()
    assert code == 1, log[-3000:]
    assert seconds < 10, f"exited {seconds:.1f}s after the reading that killed its intake"
    assert "[stream] failed: stream-intake died: ArrowInvalid:" in log, log[-3000:]
    assert log.count("Traceback") == 1 and "ingester thread stream-intake died" in log, log[-3000:]
    assert "[stream] stopping: committing and acknowledging" in log  # SIGTERM's path
    assert not Path(f"/proc/{child[0]}").exists(), "the scorer child ended with its parent"


def test_a_scorer_child_that_cannot_bind_its_port_exits_naming_it(broker, settings, store, tmp_path):
    """`platform stream --role scorer` (the child `platform stream` starts) with its HTTP port taken."""
    dataset = "iot_telemetry.stream_port_taken"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "pipelines.cli", "stream", "--dataset", dataset, "--no-scoring"]
        cmd += ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--http-port", str(port)]
        cmd += ["--role", "scorer"]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_stream_env(dataset),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=25)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = out.decode()
    assert proc.returncode == 1, text[-3000:]
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in text and "in use" in text, text[-3000:]
    assert "scoring the ingester's readings" not in text  # it did not go on without its endpoints
