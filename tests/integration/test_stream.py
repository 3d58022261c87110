"""The live path against real services: a Mosquitto broker and a Redis started here on free ports
(persistence in a temp dir, password file and ACL as in compose/mosquitto), the session's object
store and MLflow.

Every check counts readings against the simulator's per-device sequence numbers: after faults
(kill -9 of the ingester in the middle of a batch, a broker restart) bronze holds every published
reading exactly once, and so does silver after build_silver.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PASSWD = shutil.which("mosquitto_passwd")
USERS = {  # one user per role, as in compose/mosquitto
    "ingester": "ingester-secret",
    "gateway": "gateway-secret",  # the simulator: publishes for the whole fleet
    "device-01": "device-01-secret",  # a device: may publish to its own topic only
    "alerts-reader": "reader-secret",
}
ACL = """\
user ingester
topic read sensors/#
topic write alerts/#
topic write ingest/#

user gateway
topic write sensors/#

user alerts-reader
topic read alerts/#
topic read ingest/#

pattern write sensors/+/%u
"""
START = dt.date.today() - dt.timedelta(days=3)  # event times in the past: silver refuses the future


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Broker:
    """A Mosquitto of our own: 127.0.0.1:<free port>, persistence in a temp dir, auth and ACL."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
        self.port = free_port()
        (self.dir / "data").mkdir()
        (self.dir / "acl").write_text(ACL)
        passwords = self.dir / "passwd"
        passwords.touch()
        for user, password in USERS.items():
            subprocess.run([PASSWD, "-b", str(passwords), user, password], check=True, capture_output=True)
        os.chmod(passwords, 0o600)
        (self.dir / "mosquitto.conf").write_text(
            f"""\
# run as whoever runs the tests (as root Mosquitto would switch to its own user, which cannot read tmp)
user {pwd.getpwuid(os.getuid()).pw_name}
listener {self.port} 127.0.0.1
allow_anonymous false
password_file {passwords}
acl_file {self.dir / "acl"}
persistence true
persistence_location {self.dir / "data"}/
autosave_interval 1
max_inflight_messages 0
max_queued_messages 0
log_dest file {self.dir / "mosquitto.log"}
log_type error
log_type warning
log_type notice
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")])
        wait_for(self._listening, 10, f"mosquitto on port {self.port}")
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def redis_url():
    server = shutil.which("redis-server")
    if not server:
        pytest.fail("redis-server is needed: `apt-get install redis-server`")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _port_open(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def stream_settings(broker: Broker, dataset: str, **overrides):
    from pipelines.settings import StreamSettings

    values = {
        "mqtt_host": "127.0.0.1",
        "mqtt_port": broker.port,
        "mqtt_username": "ingester",
        "mqtt_password": USERS["ingester"],
        "client_id": f"ingester-{dataset}",
        "batch_max_readings": 500,
        "batch_max_seconds": 0.5,
        "scoring": False,
    }
    return StreamSettings(**(values | overrides))


def gateway(broker: Broker, name: str):
    from pipelines.streaming.publisher import FleetPublisher

    pub = FleetPublisher("127.0.0.1", broker.port, client_id=name, username="gateway", password=USERS["gateway"])
    wait_for(pub.client.is_connected, 10, "the gateway to connect")
    return pub


class Listener:
    """Subscribes (as alerts-reader) to alerts and commit events and keeps what arrives."""

    def __init__(self, broker: Broker, dataset: str):
        import paho.mqtt.client as mqtt

        self.alerts: list[dict] = []
        self.commits: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"listener-{os.urandom(3).hex()}")
        self.client.username_pw_set("alerts-reader", USERS["alerts-reader"])
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: (
            c.subscribe(f"alerts/{dataset}/+", qos=1),
            c.subscribe(f"ingest/{dataset}/commits", qos=1),
        )
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "the listener to connect")
        time.sleep(0.2)  # the subscriptions are in place

    def _on_message(self, client, userdata, msg) -> None:
        event = json.loads(msg.payload)
        (self.commits if msg.topic.endswith("/commits") else self.alerts).append(event)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bronze_rows(store, dataset: str) -> pd.DataFrame:
    from pipelines import storage

    frames = []
    for partition in storage.list_partitions(store, "bronze", dataset):
        frames.append(storage.read_partition(store, "bronze", dataset, partition).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["device", "_source_line"])


def assert_exactly_once(rows: pd.DataFrame, published: dict[str, int]) -> None:
    """Every (device, seq) the simulator published is in `rows` exactly once, and nothing else is."""
    counts = rows.groupby(["device", "_source_line"]).size()
    duplicated = counts[counts > 1]
    assert duplicated.empty, f"{len(duplicated)} readings more than once, e.g. {duplicated.head(5).to_dict()}"
    expected = {(d, s) for d, n in published.items() for s in range(n)}
    found = set(zip(rows["device"], rows["_source_line"].astype(int), strict=True))
    assert not expected - found, f"{len(expected - found)} readings lost, e.g. {sorted(expected - found)[:5]}"
    assert not found - expected, f"{len(found - expected)} unexpected readings, e.g. {sorted(found - expected)[:5]}"


def readings(devices: int = 4, days: int = 1, start: dt.date = START):
    from pipelines.simulator import stream_readings

    return list(stream_readings(start, days, devices=devices, freq_seconds=60))


# ------------------------------------------------------------------------------------- unit-sized


def test_seq_runs_merge_and_answer_membership():
    from pipelines.streaming.ledger import SeqSet

    seqs = SeqSet()
    for value in [5, 1, 2, 3, 9, 4, 7]:
        seqs.add(value)
    assert seqs.runs() == [(1, 5), (7, 7), (9, 9)]
    seqs.add(8)
    assert seqs.runs() == [(1, 5), (7, 9)]
    seqs.add_range(0, 20)
    assert seqs.runs() == [(0, 20)] and 20 in seqs and 21 not in seqs and len(seqs) == 21


def test_a_restarted_scorer_counts_only_streamed_seqs_as_scored_not_a_landed_file_s_line_numbers():
    """Found streaming NAB as the README says (land the first 11,000 rows, train, publish the rest with
    --start-seq 11000): the scorer took the landed file's line numbers (2..11,001) read back from
    bronze for seqs already scored, and left readings 11,000 and 11,001 unscored."""
    from pipelines.streaming.live import streamed_seqs

    landed = pd.DataFrame(
        {
            "device": "machine_temperature",
            "_source_key": "s3://landing/nab/2026-12-07/first.csv",
            "_source_line": pd.array(range(2, 11002), dtype="Int64"),
        }
    )
    streamed = pd.DataFrame(
        {
            "device": ["machine_temperature"] * 3 + ["other"],
            "_source_key": ["mqtt://sensors/nab/machine_temperature"] * 3 + ["mqtt://sensors/nab/other"],
            "_source_line": pd.array([11002, 11003, 11004, 7], dtype="Int64"),
        }
    )
    seqs = streamed_seqs(pd.concat([landed, streamed], ignore_index=True), "device")
    assert seqs["machine_temperature"].runs() == [(11002, 11004)] and seqs["other"].runs() == [(7, 7)]
    assert 11000 not in seqs["machine_temperature"] and 2 not in seqs["machine_temperature"]


def test_a_message_is_a_reading_or_a_refusal_with_its_rule():
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.streaming.messages import MessageReader, Reading, Refusal

    reader = MessageReader(
        "iot_telemetry", load_contract(get_dataset("iot_telemetry").contract_path), frozenset({"d1"})
    )
    ok = reader.read("sensors/iot_telemetry/d1", json.dumps({"seq": 3, "ts": 86400 * 2 + 5, "temp": 21.5}).encode())
    assert isinstance(ok, Reading) and ok.partition == "1970-01-03" and ok.values["device"] == "d1"
    assert ok.values["temp"] == "21.5" and "seq" not in ok.values
    cases = {
        ("sensors/iot_telemetry/d1", b"{not json"): "parse_error",
        ("sensors/iot_telemetry/d1", b"[1, 2]"): "parse_error",
        ("sensors/iot_telemetry/d1", b'{"ts": 1}'): "seq",
        ("sensors/iot_telemetry/d1", b'{"seq": "7", "ts": 1}'): "seq",
        ("sensors/iot_telemetry/d9", b'{"seq": 1, "ts": 1}'): "unknown_device",
        ("sensors/other/d1", b'{"seq": 1, "ts": 1}'): "topic",
        ("sensors/iot_telemetry/d1", b'{"seq": 1, "device": "d2"}'): "device_mismatch",
    }
    for (topic, payload), rule in cases.items():
        refused = reader.read(topic, payload)
        assert isinstance(refused, Refusal) and refused.rule == rule, (topic, payload, refused)
        assert refused.reason and refused.payload == payload.decode()


def test_a_pass_of_messages_is_filed_under_the_dates_the_lake_gives_each_one():
    """`read_many` parses a pass's event times together (NAB's strptime format included): each reading
    gets the date `event_dates` gives it alone, an unreadable time the receipt date, refusals stay."""
    import time as _time

    import pyarrow as pa

    from pipelines.contracts import load_contract
    from pipelines.layers.partitioning import event_dates
    from pipelines.streaming.messages import MessageReader, Reading, Refusal

    contract = load_contract("nab_machine_temperature")
    reader = MessageReader("nab_machine_temperature", contract)
    device = contract.entity.constant
    stamps = ["2013-12-02 21:15:00", " 2014-02-28 23:55:00 ", "2013-12-02 24:00:00", "", "1999-01-01 00:00:00"]
    messages = [
        (f"sensors/nab_machine_temperature/{device}", json.dumps({"seq": i, "timestamp": ts, "value": "1"}).encode())
        for i, ts in enumerate(stamps)
    ]
    messages.insert(2, (f"sensors/nab_machine_temperature/{device}", b"{not json"))
    items = reader.read_many(messages)
    assert isinstance(items[2], Refusal) and items[2].rule == "parse_error"
    readings = [item for item in items if isinstance(item, Reading)]
    today = _time.strftime("%Y-%m-%d", _time.gmtime())
    alone = [event_dates(pa.table({"timestamp": pa.array([ts], pa.string())}), contract).iloc[0] for ts in stamps]
    assert [r.partition for r in readings] == [d if isinstance(d, str) else today for d in alone]
    assert [r.partition for r in readings][:2] == ["2013-12-02", "2014-02-28"]
    assert [r.partition for r in readings][2:] == [today] * 3  # not a time, missing, implausibly early
    assert [reader.read(*m).partition for m in messages if m[1] != b"{not json"] == [r.partition for r in readings]


def test_the_canary_routes_devices_and_the_shadow_scores_the_same_readings():
    """During a rollout each device is scored by the model `route` gives it (sticky per device), and the
    shadow scores the same readings beside the served score; no rollout: the champion serves all."""
    from types import SimpleNamespace

    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.serving.routing import route
    from pipelines.streaming.messages import MessageReader, bronze_table
    from pipelines.streaming.scoring import FixedModels, OnlineScorer

    class Constant:
        def __init__(self, value: float):
            self.value = value

        def predict(self, frame):
            return np.full(len(frame), self.value)

    champion = SimpleNamespace(version="1", columns=["temp"], threshold=0.5, estimator=Constant(0.1))
    challenger = SimpleNamespace(version="2", columns=["temp"], threshold=0.5, estimator=Constant(0.9))
    rollout = SimpleNamespace(active=True, weight=50, shadow="challenger", rollout_id="r-1", model_name="m")
    contract = load_contract(get_dataset("iot_telemetry").contract_path)
    reader = MessageReader("iot_telemetry", contract)
    batch = [
        reader.read(f"sensors/iot_telemetry/{r['device']}", json.dumps(r).encode())
        for r in readings(devices=40)
        if r["seq"] < 2
    ]
    table = bronze_table(batch, reader.columns, batch_key="k", run_id="r", ingested_at=pd.Timestamp.now(tz="UTC"))
    scored = OnlineScorer(contract, "15min", "4h", FixedModels(champion, challenger, rollout), "m").score_bronze(table)
    assert len(scored) == len(batch)
    roles = {s.device: s.role for s in scored}
    assert roles == {d: route(d, 50, "r-1") for d in roles} and set(roles.values()) == {"champion", "challenger"}
    for s in scored:
        assert s.score == (0.9 if s.role == "challenger" else 0.1) and s.model_version == (
            "2" if s.role == "challenger" else "1"
        )
        # the challenger shadows the champion's readings: both models on the same records
        assert (s.shadow == {"role": "challenger", "model_version": "2", "score": 0.9}) == (s.role == "champion")
    plain = OnlineScorer(contract, "15min", "4h", FixedModels(champion, challenger), "m").score_bronze(table)
    assert {s.role for s in plain} == {"champion"} and all(s.shadow is None for s in plain)


def test_a_streaming_detector_champion_goes_on_from_pass_to_pass_on_a_nab_series(nab_csv):
    """The default family (a streaming detector) scores live: each device's detector state goes on from
    the end of its training rows and from one pass to the next, so a NAB series scored in passes gets
    exactly the scores one pass over all of it gives. (The live path had sent it down the numeric
    models' matrix path, which failed on the device column: no NAB reading was scored.)"""
    from types import SimpleNamespace

    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.streaming.messages import MessageReader, bronze_table
    from pipelines.streaming.scoring import FixedModels, OnlineScorer
    from pipelines.training import StreamingScorer

    dataset = "nab_machine_temperature"
    contract = load_contract(get_dataset(dataset).contract_path)
    reader = MessageReader(dataset, contract)
    frame = pd.read_csv(nab_csv, nrows=2400)
    device = contract.entity.constant
    train = pd.DataFrame(
        {"device": device, "ts": pd.to_datetime(frame["timestamp"][:1200], utc=True), "temp": frame["value"][:1200]}
    )
    model = SimpleNamespace(
        version="1",
        columns=["device", "ts", "temp"],
        threshold=0.5,
        estimator=StreamingScorer("contextual", ["temp"]).fit(train),
    )
    live = [
        reader.read(f"sensors/{dataset}/{device}", json.dumps({"timestamp": t, "value": v, "seq": i}).encode())
        for i, (t, v) in enumerate(zip(frame["timestamp"][1200:], frame["value"][1200:], strict=True))
    ]
    now = pd.Timestamp.now(tz="UTC")

    def table(rows):
        return bronze_table(rows, reader.columns, batch_key="k", run_id="r", ingested_at=now)

    def fresh():
        return OnlineScorer(contract, "15min", "4h", FixedModels(model), dataset)

    scorer = fresh()
    passes = [s.score for i in range(0, len(live), 200) for s in scorer.score_bronze(table(live[i : i + 200]))]
    once = [s.score for s in fresh().score_bronze(table(live))]
    assert len(passes) == len(live) == 1200 and passes == once
    assert max(once) > 0
    # what scoring each pass from the training state again would have given: not the same stream
    restarted = [s.score for i in range(0, len(live), 200) for s in fresh().score_bronze(table(live[i : i + 200]))]
    assert restarted != once

    # A scorer that restarts replays the committed readings after the model's training end into the
    # detector's device states (warm_streams, from warm_tails), so it goes on where the last one was.
    committed, after = live[:700], live[700:]
    before = fresh()
    before.score_bronze(table(committed))
    expected = [s.score for s in before.score_bronze(table(after))]
    warmed = fresh()
    silver, _ = warmed.silver.split(table(committed))
    assert warmed.warm_streams(silver) == {"champion": 700}
    assert [s.score for s in warmed.score_bronze(table(after))] == expected
    cold = [s.score for s in fresh().score_bronze(table(after))]
    assert cold != expected


# ------------------------------------------------------------------------------------- with a broker


def test_readings_reach_bronze_exactly_once_and_bad_messages_are_quarantined(broker, store):
    """Redelivered and re-sent readings are not duplicated; a malformed message, an unknown device and
    a device naming another one are quarantined with their rule; a device publishing to another
    device's topic is refused by the broker; an unknown client cannot connect. The stream flows on."""
    import paho.mqtt.client as mqtt

    from pipelines import storage
    from pipelines.streaming.commit import refused_dataset
    from pipelines.streaming.ingester import Ingester
    from pipelines.streaming.publisher import FleetPublisher

    dataset = "iot_telemetry.stream_basic"
    cfg = stream_settings(broker, dataset, known_devices="device-01,device-02,device-03")
    ingester = Ingester(dataset, cfg, store=store).start()
    assert ingester.wait_connected(10)
    pub = gateway(broker, "gw-basic")
    data = [r for r in readings(devices=3) if r["seq"] < 300]
    published = {d: 300 for d in ("device-01", "device-02", "device-03")}
    for r in data[:450]:
        pub.publish(dataset, r)
    pub.publish_raw(f"sensors/{dataset}/device-02", b"{this is not json")
    pub.publish_raw(f"sensors/{dataset}/device-99", json.dumps({**data[0], "device": "device-99"}))
    pub.publish_raw(f"sensors/{dataset}/device-03", json.dumps({**data[0], "device": "device-01"}))
    for r in data[100:200]:  # a device re-sending what it already sent (e.g. after its own reconnect)
        pub.publish(dataset, r)
    # A device may publish to its own topic only (ACL `pattern write sensors/+/%u`): denied, dropped.
    device = FleetPublisher(
        "127.0.0.1", broker.port, client_id="device-01", username="device-01", password=USERS["device-01"]
    )
    wait_for(device.client.is_connected, 10, "device-01 to connect")
    device.publish_raw(f"sensors/{dataset}/device-02", json.dumps({**data[1], "seq": 10_000}))
    device.flush(10)
    # No valid password, no session: the broker refuses the connection and says why.
    refused: dict = {}
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
    intruder.username_pw_set("device-77", "guess")
    intruder.on_connect = lambda c, u, f, reason, p: refused.setdefault("reason", str(reason))
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    wait_for(lambda: refused, 10, "the broker's answer to an unknown client")
    intruder.loop_stop()
    assert not intruder.is_connected() and "authori" in refused["reason"].lower(), refused
    for r in data[450:]:
        pub.publish(dataset, r)
    pub.flush(30)
    device.close()
    wait_for(lambda: ingester.stats.committed_rows >= len(data), 30, "every reading committed")
    wait_for(lambda: ingester.stats.acked >= ingester.stats.received, 10, "every message acknowledged")
    ingester.stop()
    pub.close()

    assert_exactly_once(bronze_rows(store, dataset), published)
    assert ingester.stats.duplicates == 100
    refused = storage.read_partition(
        store, "quarantine", refused_dataset(dataset), dt.date.today().isoformat()
    ).to_pandas()
    assert sorted(refused["rule"]) == ["device_mismatch", "parse_error", "unknown_device"]
    assert refused.set_index("rule").loc["parse_error", "payload"] == "{this is not json"
    assert "not registered" in refused.set_index("rule").loc["unknown_device", "reason"]


def _register_stream_model(settings) -> tuple[str, str]:
    """A real IsolationForest on gold features of simulated days, registered with its threshold."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mlflow
    from mlflow import MlflowClient
    from pipelines import training
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.layers.gold import to_gold
    from pipelines.layers.silver import to_silver
    from pipelines.simulator import simulate_day_csv

    contract = load_contract(get_dataset("iot_telemetry").contract_path)
    raw = pd.read_csv(io.BytesIO(simulate_day_csv(START - dt.timedelta(days=5), 4, 60, 7)), dtype=str)
    raw["_parse_error"] = None
    silver, _ = to_silver(raw, contract)
    gold = to_gold(silver, contract, "15min", long_window="4h")
    features = ["temp", "temp_roll_std", "temp_zscore", "temp_delta", "temp_long_dev", "humidity_flat_count"]
    model = training.AnomalyScorer(
        Pipeline([("scale", StandardScaler()), ("model", IsolationForest(n_estimators=50, random_state=0))])
    ).fit(gold[features])
    scores = model.predict(gold[features])
    threshold = float(np.quantile(scores, 0.97))
    uri = settings.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("stream-tests")
    name = "stream-test-detector"
    with mlflow.start_run() as run:
        mlflow.log_metric("decision_threshold", threshold)
        mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(gold[features], scores),
            serialization_format="skops",
            skops_trusted_types=training.SKOPS_TRUSTED_TYPES,
            pip_requirements=["scikit-learn", "skops"],
            registered_model_name=name,
        )
    client = MlflowClient(uri, registry_uri=uri)
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert client.get_model_version(name, str(version)).run_id == run.info.run_id
    client.set_registered_model_alias(name, "champion", str(version))
    return name, str(version)


def test_streamed_scores_equal_batch_scores_and_anomalies_are_alerted(broker, redis_url, settings, store):
    """Replay: readings streamed through the ingester are scored by the champion with gold's own
    features; the same rows built into silver and gold by the batch jobs and scored by the same model
    give the same scores, and exactly the readings at or above the threshold were alerted. Half-way
    the scorer is restarted as its own process, warmed up from bronze: the equality holds across it."""
    from pipelines.jobs.lake import build_gold, build_silver, read_gold
    from pipelines.serving.models import ModelManager
    from pipelines.streaming.http import serve_in_thread, state_app
    from pipelines.streaming.ingester import build_ingester

    name, version = _register_stream_model(settings)
    manager = ModelManager(settings, name, 3600, None)
    manager.poll_once()
    champion = manager.get("champion")
    assert champion is not None and champion.version == version, manager.problems

    dataset = "iot_telemetry.stream_replay"
    start = START - dt.timedelta(days=1)
    data = [r for r in readings(devices=4, days=2, start=start) if r["ts"] < _epoch(start) + 86400 + 6 * 3600]
    cut = next(i for i, r in enumerate(data) if r["ts"] >= _epoch(start) + 86400 + 2 * 3600)
    listener = Listener(broker, dataset)
    pub = gateway(broker, "gw-replay")
    from pipelines.streaming.ingester import build_scorer_process
    from pipelines.streaming.publisher import publish_at_rate

    # 1. Scoring in the ingester's process (threads), as the tests and small fleets run it.
    cfg = stream_settings(broker, dataset, scoring=True, redis_url=redis_url)
    ingester = build_ingester(dataset, cfg, store=store, models=manager).start()
    assert ingester.wait_connected(10)
    publish_at_rate(pub, dataset, data[:cut], rate=4000)
    pub.flush(30)
    wait_for(lambda: ingester.stats.committed_rows >= cut, 60, "every reading committed")
    wait_for(lambda: ingester.scoring.scored >= cut, 60, "every reading scored")
    ingester.stop()

    # 2. As `platform stream` runs: ingest in one process, score in another (here: the two ends of a
    # pipe, as between `platform stream` and its child) that starts warm, each device's windows read
    # back from bronze, so its first scores equal gold's too.
    from pipelines.streaming.live import ScoringPipe

    read_end, write_end = os.pipe()
    pipe = ScoringPipe().start()
    pipe.attach(os.fdopen(write_end, "wb"))
    ingester = build_ingester(dataset, cfg, store=store, score_in_process=False, scoring=pipe).start()
    scorer = build_scorer_process(dataset, cfg, source=os.fdopen(read_end, "rb"), store=store, models=manager).start()
    http_port = free_port()
    server = serve_in_thread(state_app(scorer.worker.state, scorer.status), "127.0.0.1", http_port)
    assert ingester.wait_connected(10)
    wait_for(lambda: scorer.client.is_connected(), 10, "the scorer to connect")
    publish_at_rate(pub, dataset, data[cut:], rate=4000)
    pub.flush(30)
    wait_for(lambda: ingester.stats.committed_rows >= len(data) - cut, 60, "every reading committed")
    wait_for(lambda: scorer.worker.scored >= len(data) - cut, 60, "every reading scored")
    time.sleep(0.5)  # the last alerts in flight
    state = httpx.get(f"http://127.0.0.1:{http_port}/devices/device-03", timeout=5).json()
    devices = httpx.get(f"http://127.0.0.1:{http_port}/devices", timeout=5).json()["devices"]
    health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5)
    ingester.stop()  # closes the pipe: the scorer reads to its end
    wait_for(scorer.ended.is_set, 10, "the scorer to see the pipe closed")
    scorer.stop()
    server.should_exit = True
    listener.close()
    assert pipe.status()["forwarded"] == len(data) - cut and not pipe.dropped_backlog + pipe.dropped_no_scorer
    pub.close()

    assert health.status_code == 200 and health.json()["state_store"] is True
    assert devices == ["device-01", "device-02", "device-03", "device-04"]
    last = max(r["seq"] for r in data if r["device"] == "device-03")
    assert state["seq"] == last and state["model_version"] == version and state["reading"]["device"] == "device-03"

    partitions = [start.isoformat(), (start + dt.timedelta(days=1)).isoformat()]
    for partition in partitions:
        build_silver(partition, "stream-replay", dataset=dataset, store=store, progress=lambda _m: None)
        build_gold(partition, "stream-replay", dataset=dataset, store=store, progress=lambda _m: None)
    gold, _ = read_gold(partitions, dataset=dataset, store=store)
    assert len(gold) == len(data)
    from pipelines.streaming.scoring import predict

    gold = gold.sort_values(["device", "ts"]).reset_index(drop=True)
    batch_scores = predict(champion, gold)
    flagged = gold.loc[batch_scores >= champion.threshold, ["device", "ts"]]
    alerts = pd.DataFrame(listener.alerts)
    assert len(alerts) > 5, "the simulated faults should raise some alerts"
    assert (alerts["threshold"] == champion.threshold).all() and (alerts["model_version"] == version).all()
    alerts["ts"] = pd.to_datetime(alerts["ts"], utc=True)
    merged = alerts.merge(
        gold.assign(batch_score=batch_scores)[["device", "ts", "batch_score"]], on=["device", "ts"], how="left"
    )
    np.testing.assert_allclose(merged["score"], merged["batch_score"], rtol=1e-6, atol=1e-9)
    near = np.abs(batch_scores - champion.threshold) < 1e-6  # float32 rounding may tip a reading on the line
    expected = {
        (d, t)
        for d, t, n in zip(flagged["device"], flagged["ts"], near[batch_scores >= champion.threshold], strict=True)
        if not n
    }
    got = set(zip(alerts["device"], alerts["ts"], strict=True))
    assert expected <= got and len(got - expected) <= int(near.sum()), (len(expected), len(got))
    assert len(got) == len(alerts), "one alert per anomalous reading"
    alert = listener.alerts[0]
    assert {"score", "threshold", "model_version", "reading", "seq", "device"} <= set(alert)


def _epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def _start_ingester_process(broker: Broker, dataset: str, log_path: Path) -> subprocess.Popen:
    env = os.environ | {
        "PLATFORM_STREAM_MQTT_USERNAME": "ingester",
        "PLATFORM_STREAM_MQTT_PASSWORD": USERS["ingester"],
        "PLATFORM_STREAM_CLIENT_ID": f"ingester-{dataset}",
        "PLATFORM_STREAM_BATCH_MAX_SECONDS": "0.5",
        "PLATFORM_STREAM_BATCH_MAX_READINGS": "400",
    }
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "stream",
        "--dataset",
        dataset,
        "--no-scoring",
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        str(broker.port),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


def test_a_restarted_ingester_knows_what_it_committed_for_a_one_device_contract(store, nab_csv):
    """A NAB contract names its one device as a constant (its bronze rows have no device column) and
    files a month per partition. A restarted ingester's ledger reads the committed seqs back all the
    same: it had stopped its intake thread with "No match for FieldRef.Name(device)" on the first
    reading after a restart, and looked seqs up under the day, not the month, so a redelivery after a
    crash would have been committed twice."""
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.streaming.commit import BronzeCommitter
    from pipelines.streaming.messages import MessageReader

    dataset = "nab_machine_temperature.ledger_restart"  # a lake of its own (a month-grain dataset)
    ds = get_dataset(dataset)
    assert ds.grain == "month"  # the ledger must look its seqs up by the month the manifest covers
    contract = load_contract(ds.contract_path)
    reader = MessageReader(dataset, contract)
    device = contract.entity.constant
    frame = pd.read_csv(nab_csv, nrows=40)
    base = 500_000
    items = reader.read_many(
        [
            (f"sensors/{dataset}/{device}", json.dumps({"timestamp": t, "value": v, "seq": base + i}).encode())
            for i, (t, v) in enumerate(zip(frame["timestamp"], frame["value"], strict=True))
        ]
    )
    first = BronzeCommitter(store, dataset, contract, reader.columns, ds.grain, "stream-test-1")
    assert first.commit(items[:30]).rows == 30
    restarted = BronzeCommitter(store, dataset, contract, reader.columns, ds.grain, "stream-test-2")
    assert [restarted.already_committed(r) for r in items] == [True] * 30 + [False] * 10
    result = restarted.commit(items)  # a redelivery of the 30 and 10 new ones
    assert (result.rows, result.duplicates) == (10, 30)


def test_kill_9_mid_batch_and_a_broker_restart_lose_and_duplicate_nothing(broker, store, tmp_path):
    """The ingester process is killed with SIGKILL while batches are open and being committed; it is
    restarted; then the broker is restarted under a steady stream. Afterwards bronze, and silver after
    build_silver, hold each published reading exactly once."""
    from pipelines import storage
    from pipelines.jobs.lake import build_silver

    dataset = "iot_telemetry.stream_faults"
    log_path = tmp_path / "ingester.log"
    listener = Listener(broker, dataset)
    data = readings(devices=4, days=1)  # 5,760 readings, one event date
    published: dict[str, int] = {}
    pub = gateway(broker, "gw-faults")
    sent = threading.Event()
    procs = [_start_ingester_process(broker, dataset, log_path)]

    def send():
        from pipelines.streaming.publisher import publish_at_rate

        publish_at_rate(
            pub, dataset, data, rate=600, on_sent=lambda r, _t: published.__setitem__(r["device"], r["seq"] + 1)
        )
        sent.set()

    try:
        wait_for(lambda: log_path.exists() and "[stream]" in log_path.read_text(), 30, "the ingester to start")
        time.sleep(1.0)  # its session and subscription are in place
        threading.Thread(target=send, daemon=True).start()
        wait_for(lambda: sum(c["rows"] for c in listener.commits) > 1000, 30, "some commits")
        in_flight = sum(published.values()) - sum(c["rows"] for c in listener.commits)
        procs[-1].send_signal(signal.SIGKILL)  # in the middle of a batch: readings received, not committed
        procs[-1].wait(10)
        time.sleep(1.0)  # the broker queues for the absent, persistent session
        procs.append(_start_ingester_process(broker, dataset, log_path))
        wait_for(lambda: sum(published.values()) > 3500, 30, "more readings published")
        assert not sent.is_set(), "the broker restart should happen while the simulator publishes"
        broker.stop()  # a restart of the broker under the stream: publisher and ingester reconnect
        time.sleep(1.0)
        broker.start()
        assert sent.wait(60), "the simulator did not finish publishing"
        pub.flush(60)
        wait_for(lambda: _bronze_count(store, dataset) >= len(data), 60, "bronze to hold every reading", interval=0.5)
        time.sleep(1.5)  # anything redelivered late would show up now
    finally:
        for proc in procs:
            _terminate(proc)
        listener.close()
        pub.close()
    assert published == {f"device-{i:02d}": 1440 for i in range(1, 5)}
    assert in_flight > 0, "the kill should find readings published but not yet committed"
    print(
        f"killed with {in_flight} readings in flight; duplicates left out after recovery: "
        f"{sum(c['duplicates'] for c in listener.commits)}"
    )
    rows = bronze_rows(store, dataset)
    assert_exactly_once(rows, published)
    partition = START.isoformat()
    report = build_silver(partition, "stream-faults", dataset=dataset, store=store, progress=lambda _m: None)
    silver = storage.read_partition(store, "silver", dataset, partition).to_pandas()
    assert report.quarantined == 0 and len(silver) == len(data)
    assert_exactly_once(silver, published)
    assert "Traceback" not in log_path.read_text()


def test_platform_stream_scores_in_its_child_and_restarts_it_after_a_kill(broker, settings, store, tmp_path):
    """`platform stream` as deployed: the ingester feeds its scorer child over a pipe and the child
    publishes alerts with the champion's version; the child killed with SIGKILL is restarted by the
    ingester, warms up from bronze and alerts again, while the ingester commits every reading."""
    import yaml

    name, version = _register_stream_model(settings)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"]["iot_telemetry"]["model_name"] = name  # this module's registered model
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    dataset = "iot_telemetry.stream_cli"
    http_port = free_port()
    log_path = tmp_path / "stream.log"
    env = os.environ | {
        "PLATFORM_PARAMS_FILE": str(params_file),
        "PLATFORM_STREAM_MQTT_USERNAME": "ingester",
        "PLATFORM_STREAM_MQTT_PASSWORD": USERS["ingester"],
        "PLATFORM_STREAM_CLIENT_ID": f"ingester-{dataset}",
        "PLATFORM_STREAM_BATCH_MAX_SECONDS": "0.5",
    }
    cmd = [sys.executable, "-m", "pipelines.cli", "stream", "--dataset", dataset, "--mqtt-host", "127.0.0.1"]
    cmd += ["--mqtt-port", str(broker.port), "--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    listener = Listener(broker, dataset)
    pub = gateway(broker, "gw-cli")
    data = readings(devices=4, days=1)
    half = len(data) // 2

    def scorer_pid() -> int | None:
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        return int(found[0]) if found else None

    def scored() -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/status", timeout=2).json()["scoring"]["scored"]
        except (httpx.HTTPError, KeyError, ValueError):
            return -1

    from pipelines.streaming.publisher import publish_at_rate

    try:
        wait_for(lambda: scored() >= 0, 60, "the scorer child to serve its status")
        publish_at_rate(pub, dataset, data[:half], rate=3000)
        wait_for(lambda: scored() >= half, 60, "the first half scored in the child")
        first_alerts = len(listener.alerts)
        first = scorer_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "restarting it" in log_path.read_text(), 30, "the ingester to restart its scorer")
        wait_for(lambda: scored() >= 0, 60, "the restarted scorer to serve its status")
        publish_at_rate(pub, dataset, data[half:], rate=3000)
        pub.flush(30)
        wait_for(lambda: scored() >= len(data) - half, 60, "the second half scored by the new child")
        wait_for(lambda: _bronze_count(store, dataset) >= len(data), 60, "bronze to hold every reading")
        time.sleep(0.5)  # the last alerts in flight
    finally:
        _terminate(proc)
        listener.close()
        pub.close()
    log = log_path.read_text()
    assert proc.returncode == 0, log[-2000:]
    assert first_alerts > 0, "the simulated faults raise alerts in the first half"
    later = [a for a in listener.alerts[first_alerts:] if a["seq"] >= half // 4]
    assert later, "the restarted scorer alerts on the second half"
    assert {a["model_version"] for a in listener.alerts} == {version}
    assert f"the scorer exited ({-signal.SIGKILL}); restarting it" in log
    assert "Traceback" not in log, log[-3000:]
    assert_exactly_once(bronze_rows(store, dataset), {f"device-{i:02d}": 1440 for i in range(1, 5)})


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (the CLI's graceful path: commit, acknowledge, disconnect), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _bronze_count(store, dataset: str) -> int:
    from pipelines import storage

    return sum(
        (storage.read_manifest(store, "bronze", dataset, p).rows)
        for p in storage.list_partitions(store, "bronze", dataset)
    )


def test_airflow_is_told_which_partitions_a_commit_touched():
    """The notifier's REST calls (login, asset lookup by URI, asset event with the partitions)
    against a recording server speaking Airflow's API; partitions of a failed call are resent."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from pipelines.streaming.notify import AirflowAssetNotifier

    calls: list[tuple[str, dict]] = []
    fail_next = {"event": True}

    async def token(request: Request):
        body = await request.json()
        calls.append(("token", body))
        return JSONResponse({"access_token": "t0k"}, 201)

    async def assets(request: Request):
        calls.append(("assets", dict(request.query_params)))
        return JSONResponse({"assets": [{"id": 7, "uri": "s3://lake/bronze/iot_telemetry/stream"}], "total_entries": 1})

    async def events(request: Request):
        assert request.headers["authorization"] == "Bearer t0k"
        body = await request.json()
        calls.append(("event", body))
        if fail_next["event"]:
            fail_next["event"] = False
            return JSONResponse({"detail": "unavailable"}, 503)
        return JSONResponse({"id": 1, "asset_id": body["asset_id"], "extra": body["extra"]})

    app = Starlette(
        routes=[
            Route("/auth/token", token, methods=["POST"]),
            Route("/api/v2/assets", assets),
            Route("/api/v2/assets/events", events, methods=["POST"]),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: _port_open(port), 10, "the recording server")
    try:
        notifier = AirflowAssetNotifier(
            f"http://127.0.0.1:{port}",
            "s3://lake/bronze/iot_telemetry/stream",
            "iot_telemetry",
            username="admin",
            password="pw",
            interval_seconds=3600,
        )
        notifier.touched(["2026-01-05"])
        notifier.touched(["2026-01-06", "2026-01-05"])
        assert notifier.flush() is False  # the 503: kept
        notifier.touched(["2026-01-04"])
        assert notifier.flush() is True
        assert notifier.flush() is True  # nothing pending: no call
    finally:
        server.should_exit = True
        thread.join(10)
    posted = [body for kind, body in calls if kind == "event"]
    assert calls[0] == ("token", {"username": "admin", "password": "pw"})
    assert posted[-1]["asset_id"] == 7 and posted[-1]["extra"]["partitions"] == [
        "2026-01-04",
        "2026-01-05",
        "2026-01-06",
    ]
    assert posted[-1]["extra"]["dataset"] == "iot_telemetry" and len(posted) == 2
